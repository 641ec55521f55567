//! The monitor's second wall, behind the VM boundary: what a guest that breaks a device model
//! would still be inside of.
//!
//! - [`seccomp`]: one system-call allow-list per kind of thread, on by default.
//! - [`jail`]: `--jail`, namespaces, an empty root, no privileges, cgroup limits.

pub mod jail;
pub mod seccomp;

/// A lock whose holder panicked still holds valid data here.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
