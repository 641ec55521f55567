//! Raw mode for an interactive console, restored on every way out of the process.
//!
//! The saved settings live in a process-wide slot so that the panic hook and the normal exit path
//! can both restore them; restoring twice is harmless.

use std::io;
use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

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
    // SAFETY: `raw` is a fully initialised termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
        return Err(io::Error::last_os_error());
    }
    install_panic_restore();
    Ok(())
}

/// Puts the terminal back as it was; a no-op when raw mode was never entered.
pub fn restore() {
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

fn install_panic_restore() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
}
