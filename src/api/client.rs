//! `ember ctl PATH ACTION`: one request to a VM's control socket, its answer on stdout.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::cli::CtlAction;

use super::http;

/// How long `ember ctl` waits for an answer (a pause waits for every vCPU).
const DEADLINE: Duration = Duration::from_secs(60);

/// Why `ember ctl` failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Nothing answers at the path.
    #[error("cannot reach the API socket {path}: {source} (is ember running with --api-socket?)")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The exchange failed halfway.
    #[error("talking to the API socket: {0}")]
    Io(#[from] std::io::Error),
    /// The VM refused: its status and message.
    #[error("{status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The `error` of its JSON body, or the body.
        message: String,
    },
}

/// Sends `action` (with `dir` for a snapshot) to the socket at `path`; returns the answer's
/// body.
pub fn request(path: &Path, action: CtlAction, dir: Option<&Path>) -> Result<Vec<u8>, CtlError> {
    let mut body = String::new();
    let (method, resource) = match action {
        CtlAction::Info => ("GET", "/vm"),
        CtlAction::Metrics => ("GET", "/metrics"),
        CtlAction::Pause => ("PUT", "/vm/pause"),
        CtlAction::Resume => ("PUT", "/vm/resume"),
        CtlAction::Shutdown => ("PUT", "/vm/shutdown"),
        CtlAction::Snapshot => {
            let dir = dir
                .map(std::path::absolute)
                .transpose()?
                .unwrap_or_default();
            body = serde_json::json!({ "dir": dir }).to_string();
            ("PUT", "/vm/snapshot")
        }
    };
    let mut stream = UnixStream::connect(path).map_err(|source| CtlError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(DEADLINE))?;
    write!(
        stream,
        "{method} {resource} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let (status, body) = http::read_response(&mut stream)?;
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    Err(CtlError::Refused { status, message })
}
