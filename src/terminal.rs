//! Raw mode for an interactive console, restored on every way out of the process.
//!
//! The saved settings live in a process-wide slot so that the panic hook and the normal exit path
//! can both restore them; restoring twice is harmless.

use std::io;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// The same settings for a signal handler, which may not lock: set with them, taken (null) when
/// restored. The box is leaked on purpose: a handler may still be reading it.
static SAVED_FOR_SIGNALS: AtomicPtr<libc::termios> = AtomicPtr::new(std::ptr::null_mut());

/// Whether `fd` is a terminal.
pub fn is_tty(fd: libc::c_int) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Puts stdin in raw mode (no echo, no line editing, no signals from Ctrl-C: those keys belong to
/// the guest) and remembers how to undo it.
pub fn enter_raw_mode() -> io::Result<()> {
    let fd = libc::STDIN_FILENO;
    // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
    let mut original: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `original` is a valid termios to fill in.
    if unsafe { libc::tcgetattr(fd, &mut original) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut raw = original;
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut raw) };
    *ember_devices::bus::lock(&SAVED) = Some(original);
    SAVED_FOR_SIGNALS.store(Box::into_raw(Box::new(original)), Ordering::SeqCst);
    // SAFETY: `raw` is a fully initialised termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
        return Err(io::Error::last_os_error());
    }
    install_panic_restore();
    Ok(())
}

/// Puts the terminal back as it was; a no-op when raw mode was never entered.
pub fn restore() {
    SAVED_FOR_SIGNALS.store(std::ptr::null_mut(), Ordering::SeqCst);
    let saved = match SAVED.try_lock() {
        Ok(mut slot) => slot.take(),
        // Called from a panic while the lock is held: nothing sensible left to do.
        Err(_) => None,
    };
    if let Some(original) = saved {
        // SAFETY: `original` came from tcgetattr on the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &original) };
    }
}

/// [`restore`] for a signal handler that ends the process: no lock, one ioctl (TCSETS).
pub fn restore_from_signal_handler() {
    let saved = SAVED_FOR_SIGNALS.swap(std::ptr::null_mut(), Ordering::SeqCst);
    if !saved.is_null() {
        // SAFETY: a non-null pointer came from Box::into_raw in enter_raw_mode and is never
        // freed; the termios it points at came from tcgetattr on stdin.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
    }
}

fn install_panic_restore() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
}
