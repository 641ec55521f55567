//! The control socket (`ember run --api-socket PATH`): HTTP/1.1 and JSON over a Unix socket, as
//! Firecracker and Cloud Hypervisor serve theirs, so `curl --unix-socket PATH` works and
//! `ember ctl PATH …` is its client.
//!
//! One thread (`ember-api`) accepts connections and reads one request from each ([`http`]); it
//! never touches the VM. It hands the request to the main thread as an [`ApiCall`] (a channel,
//! and an eventfd the main loop watches: [`crate::main_loop::Wakeup::Api`]), which acts on it with
//! the vCPU handles it owns and answers on the call's own channel. So the VM has one owner, and
//! a client that stalls holds up only the API thread (each connection has a read deadline).
//!
//! Without `--api-socket`, none of this exists: no thread, no socket, no eventfd.

pub mod client;
pub mod http;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long a client may take to send its whole request: one thread serves every client, and
/// ember's exit waits for the request it is reading.
const READ_DEADLINE: Duration = Duration::from_secs(5);
/// How long the API thread waits for the main thread's answer (a pause waits for every vCPU).
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);
/// A snapshot writes all of guest RAM: the main thread answers when it is done, however long.
const SNAPSHOT_ANSWER_DEADLINE: Duration = Duration::from_secs(3600);

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /vm`: state, configuration, uptime, devices.
    Info,
    /// `PUT /vm/pause`: every vCPU out of KVM_RUN, at an instruction boundary.
    Pause,
    /// `PUT /vm/resume`.
    Resume,
    /// `PUT /vm/shutdown [{"timeout_s": N}]`: ask the guest to power off (through its agent,
    /// when the VM has one), and end the VM after `grace` if it has not (devices flushed, as on
    /// every way out). A zero grace ends it at once.
    Shutdown { grace: Duration },
    /// `GET /metrics`: Prometheus text.
    Metrics,
    /// `PUT /vm/snapshot {"dir": DIR}`: the VM's state and RAM into DIR, then on as before.
    Snapshot(PathBuf),
}

/// A request on its way to the main thread, with where the answer goes.
pub struct ApiCall {
    /// The request.
    pub request: ApiRequest,
    /// Where the main thread sends the answer.
    pub reply: Sender<ApiReply>,
}

/// An answer: an HTTP status and its body.
#[derive(Debug, PartialEq, Eq)]
pub struct ApiReply {
    /// The HTTP status.
    pub status: u16,
    /// `application/json` or Prometheus' text type.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

/// Prometheus' text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

impl ApiReply {
    /// 200 with `value` as JSON.
    pub fn json(value: &serde_json::Value) -> Self {
        Self {
            status: 200,
            content_type: "application/json",
            body: value.to_string().into_bytes(),
        }
    }

    /// An error: `{"error": message}` with `status`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: serde_json::json!({ "error": message.to_string() })
                .to_string()
                .into_bytes(),
        }
    }
}

/// Which request a method, path and body name, or the error answer.
fn route(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiReply> {
    let (wanted, request) = match path {
        "/vm" => ("GET", ApiRequest::Info),
        "/metrics" => ("GET", ApiRequest::Metrics),
        "/vm/pause" => ("PUT", ApiRequest::Pause),
        "/vm/resume" => ("PUT", ApiRequest::Resume),
        // Its body is read once the method is right.
        "/vm/shutdown" => (
            "PUT",
            ApiRequest::Shutdown {
                grace: Duration::ZERO,
            },
        ),
        // Its body is read once the method is right.
        "/vm/snapshot" => ("PUT", ApiRequest::Snapshot(PathBuf::new())),
        _ => return Err(ApiReply::error(404, format!("no such resource: {path}"))),
    };
    if method != wanted {
        return Err(ApiReply::error(
            405,
            format!("{path} takes {wanted}, not {method}"),
        ));
    }
    match request {
        ApiRequest::Snapshot(_) => snapshot_request(body),
        ApiRequest::Shutdown { .. } => shutdown_request(body),
        request => Ok(request),
    }
}

/// How long a graceful shutdown waits for the guest by default: its kernel is emulated here, and
/// a loaded host slows it further.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// The longest wait a client may ask for.
const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(600);

/// Nothing, or `{"timeout_s": N}` (0 to 600; 0 ends the VM at once).
fn shutdown_request(body: &[u8]) -> Result<ApiRequest, ApiReply> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        timeout_s: f64,
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ApiRequest::Shutdown {
            grace: SHUTDOWN_GRACE,
        });
    }
    let refuse = |why: String| {
        ApiReply::error(
            400,
            format!("the body must be empty or {{\"timeout_s\": 0 to 600}}: {why}"),
        )
    };
    let body: Body = serde_json::from_slice(body).map_err(|e| refuse(e.to_string()))?;
    let grace = Duration::try_from_secs_f64(body.timeout_s)
        .ok()
        .filter(|grace| *grace <= MAX_SHUTDOWN_GRACE)
        .ok_or_else(|| refuse(format!("{} is out of range", body.timeout_s)))?;
    Ok(ApiRequest::Shutdown { grace })
}

/// `{"dir": "/path"}`: an absolute directory.
fn snapshot_request(body: &[u8]) -> Result<ApiRequest, ApiReply> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        dir: PathBuf,
    }
    let body: Body = serde_json::from_slice(body).map_err(|e| {
        ApiReply::error(
            400,
            format!("the body must be {{\"dir\": \"/absolute/path\"}}: {e}"),
        )
    })?;
    if !body.dir.is_absolute() {
        return Err(ApiReply::error(
            400,
            "the snapshot directory must be an absolute path",
        ));
    }
    Ok(ApiRequest::Snapshot(body.dir))
}

/// Why the control socket cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket cannot be created at the path.
    #[error("cannot create the API socket {}: {source}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The eventfd or the thread cannot be made.
    #[error("cannot start the API thread: {0}")]
    Start(#[source] io::Error),
}

/// The control socket's thread and what the main thread reads from it.
pub struct ApiServer {
    path: PathBuf,
    listener_fd: RawFd,
    thread: Option<JoinHandle<()>>,
    /// Readable when calls wait in [`ApiServer::calls`].
    pub wake: EventFd,
    /// The calls, in order.
    pub calls: Receiver<ApiCall>,
}

impl ApiServer {
    /// Creates the socket at `path` (mode 0600; a stale socket file there is replaced, anything
    /// else is an error) and starts the thread.
    pub fn start(path: &Path) -> Result<Self, ApiError> {
        Self::serve(Self::bind(path)?)
    }

    /// Creates the socket at `path` (see [`ApiServer::start`]) without serving it yet: what a
    /// jail must open before it closes.
    pub fn bind(path: &Path) -> Result<ApiListener, ApiError> {
        let bind_error = |source| ApiError::Bind {
            path: path.to_owned(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(bind_error(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                )));
            }
            // A socket someone still answers on belongs to a running VM.
            if UnixStream::connect(path).is_ok() {
                return Err(bind_error(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another ember is listening there",
                )));
            }
            std::fs::remove_file(path).map_err(bind_error)?;
        }
        let listener = bind_private(path).map_err(bind_error)?;
        Ok(ApiListener {
            path: path.to_owned(),
            listener: Some(listener),
        })
    }

    /// Starts the thread that serves `bound`.
    pub fn serve(mut bound: ApiListener) -> Result<Self, ApiError> {
        let path = std::mem::take(&mut bound.path);
        let Some(listener) = bound.listener.take() else {
            return Err(ApiError::Start(io::Error::other(
                "the socket was served already",
            )));
        };
        let wake = EventFd::new(EFD_NONBLOCK).map_err(ApiError::Start)?;
        let thread_wake = wake.try_clone().map_err(ApiError::Start)?;
        let (sender, calls) = mpsc::channel();
        let listener_fd = listener.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name("ember-api".into())
            .spawn(move || {
                crate::sandbox::seccomp::confine_or_exit(crate::sandbox::seccomp::ThreadKind::Api);
                serve(listener, sender, thread_wake)
            })
            .map_err(ApiError::Start)?;
        log::info!("API socket at {}", path.display());
        Ok(Self {
            path: path.to_owned(),
            listener_fd,
            thread: Some(thread),
            wake,
            calls,
        })
    }
}

/// A bound control socket not served yet; dropped unserved, its file goes.
pub struct ApiListener {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ApiServer {
    /// Stops the thread (shutting the listening socket down wakes its `accept`) and removes the
    /// socket file.
    fn drop(&mut self) {
        // Calls still queued are answered "stopping" (their reply channels close with them), and
        // the thread's next send fails at once: it must not wait for a main thread that is gone.
        drop(std::mem::replace(&mut self.calls, mpsc::channel().1));
        if let Some(thread) = self.thread.take() {
            // SAFETY: shutdown on the listener's descriptor, which the thread keeps open until
            // it returns, and it returns only after this wakes it (joined just below).
            unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds with the socket file created 0600: the umask is narrowed around `bind` (it is the only
/// way to create a Unix socket with a mode), then the mode is set again in case it was not.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: umask only swaps the process's file-creation mask; no memory is involved.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The API thread: one connection at a time, one request each.
fn serve(listener: UnixListener, calls: Sender<ApiCall>, wake: EventFd) {
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(stream) => stream,
            // Shut down by ApiServer::drop (EINVAL), or the listener failed: either way, done.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut reader = DeadlineReader {
            stream: &stream,
            deadline: Instant::now() + READ_DEADLINE,
        };
        let reply = match http::read_request(&mut reader) {
            Ok(request) => match route(&request.method, &request.path, &request.body) {
                Ok(request) => ask_main_thread(request, &calls, &wake),
                Err(reply) => reply,
            },
            Err(e) => ApiReply::error(e.status(), &e),
        };
        if let Err(e) =
            http::write_response(&mut stream, reply.status, reply.content_type, &reply.body)
        {
            log::debug!("API: cannot answer a client: {e}");
        }
    }
}

/// Reads from a connection until a deadline for the whole request, not per read: a client that
/// trickles bytes cannot hold the API thread past it.
struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl io::Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&*self.stream).read(buf)
    }
}

fn ask_main_thread(request: ApiRequest, calls: &Sender<ApiCall>, wake: &EventFd) -> ApiReply {
    let deadline = match request {
        ApiRequest::Snapshot(_) => SNAPSHOT_ANSWER_DEADLINE,
        _ => ANSWER_DEADLINE,
    };
    let (reply, answer) = mpsc::channel();
    if calls.send(ApiCall { request, reply }).is_err() || wake.write(1).is_err() {
        return ApiReply::error(503, "the VM is stopping");
    }
    match answer.recv_timeout(deadline) {
        Ok(reply) => reply,
        Err(RecvTimeoutError::Timeout) => ApiReply::error(503, "the VM did not answer in time"),
        Err(RecvTimeoutError::Disconnected) => ApiReply::error(503, "the VM is stopping"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn routes_methods_and_unknown_paths() {
        assert_eq!(route("GET", "/vm", b""), Ok(ApiRequest::Info));
        assert_eq!(route("PUT", "/vm/pause", b""), Ok(ApiRequest::Pause));
        assert_eq!(route("PUT", "/vm/resume", b""), Ok(ApiRequest::Resume));
        assert_eq!(
            route("PUT", "/vm/shutdown", b""),
            Ok(ApiRequest::Shutdown {
                grace: SHUTDOWN_GRACE
            })
        );
        assert_eq!(
            route("PUT", "/vm/shutdown", br#"{"timeout_s": 0}"#),
            Ok(ApiRequest::Shutdown {
                grace: Duration::ZERO
            })
        );
        assert_eq!(
            route("PUT", "/vm/shutdown", br#"{"timeout_s": 2.5}"#),
            Ok(ApiRequest::Shutdown {
                grace: Duration::from_millis(2500)
            })
        );
        for bad in [
            &br#"{"timeout_s": -1}"#[..],
            br#"{"timeout_s": 601}"#,
            br#"{"timeout_s": "soon"}"#,
            br#"{"grace": 1}"#,
        ] {
            let refused = route("PUT", "/vm/shutdown", bad).unwrap_err();
            assert_eq!(refused.status, 400, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(route("GET", "/metrics", b""), Ok(ApiRequest::Metrics));
        assert_eq!(route("GET", "/vm/pause", b"").unwrap_err().status, 405);
        assert_eq!(route("PUT", "/vm", b"").unwrap_err().status, 405);
        assert_eq!(route("GET", "/nope", b"").unwrap_err().status, 404);
        assert_eq!(
            route("PUT", "/vm/snapshot", br#"{"dir": "/s"}"#),
            Ok(ApiRequest::Snapshot("/s".into()))
        );
        for bad in [
            &b""[..],
            b"{}",
            br#"{"dir": "rel"}"#,
            br#"{"dir": "/s", "x": 1}"#,
            b"\xff",
        ] {
            assert_eq!(route("PUT", "/vm/snapshot", bad).unwrap_err().status, 400);
        }
    }

    #[test]
    fn the_socket_answers_through_the_main_thread_and_goes_away() {
        let dir = std::env::temp_dir().join(format!("ember-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        // A stale socket file (nobody listening) is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let server = ApiServer::start(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second server on the same path is refused while this one listens.
        assert!(ApiServer::start(&path).is_err());

        let client = std::thread::spawn({
            let path = path.clone();
            move || {
                let mut s = UnixStream::connect(&path).unwrap();
                s.write_all(b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
                let first = http::read_response(&mut s).unwrap();
                let mut s = UnixStream::connect(&path).unwrap();
                s.write_all(b"garbage\r\n\r\n").unwrap();
                (first, http::read_response(&mut s).unwrap())
            }
        });
        // The main thread's side: woken (the call is queued before the wake-up is written), it
        // takes the call and answers it.
        let woken = Instant::now();
        while server.wake.read().is_err() {
            assert!(woken.elapsed() < Duration::from_secs(10), "never woken");
            std::thread::sleep(Duration::from_millis(5));
        }
        let call = server.calls.try_recv().unwrap();
        assert_eq!(call.request, ApiRequest::Pause);
        call.reply
            .send(ApiReply::json(&serde_json::json!({"state": "paused"})))
            .unwrap();
        let (first, garbage) = client.join().unwrap();
        // A client that sends part of a request and then nothing is cut off at the deadline.
        let mut slow = UnixStream::connect(&path).unwrap();
        slow.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
        let started = Instant::now();
        assert_eq!(http::read_response(&mut slow).unwrap().0, 400);
        assert!(started.elapsed() < READ_DEADLINE * 2);
        assert_eq!(first, (200, br#"{"state":"paused"}"#.to_vec()));
        assert_eq!(garbage.0, 400);
        drop(server);
        assert!(!path.exists(), "the socket file outlived the server");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
