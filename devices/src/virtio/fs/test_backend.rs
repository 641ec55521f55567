//! A stand-in for virtiofsd in the tests: a vhost-user backend on a Unix socket that answers
//! by hand what the frontend asks and keeps every request it got, with the descriptors that
//! came with it, for the test to look at. Written from the vhost-user specification, not with
//! the `vhost` crate's backend side, so that it checks the crate's frontend as well as ours.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vmm_sys_util::tempdir::TempDir;

/// Header flags (vhost-user, "Header"): version 1, reply, need-reply.
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
pub(crate) const NEED_REPLY: u32 = 0x8;
const HEADER_LEN: usize = 12;

/// virtiofsd 1.14's virtio features: VERSION_1, INDIRECT_DESC, EVENT_IDX, PROTOCOL_FEATURES,
/// LOG_ALL.
pub(crate) const VIRTIOFSD_FEATURES: u64 =
    (1 << 32) | (1 << 28) | (1 << 29) | (1 << 30) | (1 << 26);
/// virtiofsd 1.14's protocol features (without CONFIG, which it offers only with `--tag`): MQ,
/// REPLY_ACK, BACKEND_REQ, BACKEND_SEND_FD, CONFIGURE_MEM_SLOTS, LOG_SHMFD, DEVICE_STATE,
/// RESET_DEVICE.
pub(crate) const VIRTIOFSD_PROTOCOL_FEATURES: u64 =
    0x1 | 0x8 | 0x20 | 0x400 | 0x8000 | 0x2 | 0x8_0000 | 0x2000;
/// What GET_VRING_BASE answers.
pub(crate) const VRING_BASE: u32 = 7;

/// How the stand-in behaves.
#[derive(Clone, Copy)]
pub(crate) struct Script {
    pub features: u64,
    pub protocol_features: u64,
    pub queue_num: u64,
    /// The request refused (a non-zero REPLY_ACK) when the frontend asks for an answer.
    pub refuse: Option<FrontendReq>,
    /// How long the backend takes to start listening (virtiofsd still starting).
    pub listen_after: Duration,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            features: VIRTIOFSD_FEATURES,
            protocol_features: VIRTIOFSD_PROTOCOL_FEATURES,
            queue_num: 2,
            refuse: None,
            listen_after: Duration::ZERO,
        }
    }
}

/// One request as the backend got it.
pub(crate) struct Msg {
    pub code: u32,
    pub flags: u32,
    pub body: Vec<u8>,
    pub files: Vec<File>,
}

impl Msg {
    pub(crate) fn req(&self) -> FrontendReq {
        FrontendReq::try_from(self.code).unwrap()
    }

    pub(crate) fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.body[at..at + 4].try_into().unwrap())
    }

    pub(crate) fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.body[at..at + 8].try_into().unwrap())
    }
}

pub(crate) struct FakeBackend {
    _dir: TempDir,
    pub path: PathBuf,
    log: Arc<Mutex<Vec<Msg>>>,
    /// The accepted connection, for the test to cut.
    conn: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeBackend {
    pub(crate) fn start(script: Script) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/ember-fs-").unwrap();
        let path = dir.as_path().join("vfsd.sock");
        let log = Arc::new(Mutex::new(Vec::new()));
        let conn = Arc::new(Mutex::new(None));
        let thread = {
            let (log, conn, path) = (log.clone(), conn.clone(), path.clone());
            std::thread::spawn(move || {
                std::thread::sleep(script.listen_after);
                let listener = UnixListener::bind(&path).unwrap();
                let (stream, _) = listener.accept().unwrap();
                *conn.lock().unwrap() = Some(stream.try_clone().unwrap());
                serve(stream, script, &log);
            })
        };
        Self {
            _dir: dir,
            path,
            log,
            conn,
            thread: Some(thread),
        }
    }

    /// Takes the requests received so far.
    pub(crate) fn take(&self) -> Vec<Msg> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// Waits until `n` requests arrived (those the frontend does not wait an answer for may
    /// still be on their way), then takes them.
    pub(crate) fn take_at_least(&self, n: usize) -> Vec<Msg> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log.lock().unwrap().len() < n {
            assert!(Instant::now() < deadline, "the requests did not arrive");
            std::thread::sleep(Duration::from_millis(5));
        }
        self.take()
    }

    /// The backend dies: its end of the connection closes.
    pub(crate) fn die(&mut self) {
        if let Some(conn) = self.conn.lock().unwrap().take() {
            conn.shutdown(std::net::Shutdown::Both).unwrap();
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// Answers requests until the frontend hangs up (or the test cuts the connection).
fn serve(mut stream: UnixStream, script: Script, log: &Mutex<Vec<Msg>>) {
    while let Some(msg) = receive(&mut stream) {
        let reply: Option<Vec<u8>> = match msg.req() {
            FrontendReq::GET_FEATURES => Some(script.features.to_le_bytes().to_vec()),
            FrontendReq::GET_PROTOCOL_FEATURES => {
                Some(script.protocol_features.to_le_bytes().to_vec())
            }
            FrontendReq::GET_QUEUE_NUM => Some(script.queue_num.to_le_bytes().to_vec()),
            FrontendReq::GET_VRING_BASE => {
                let index = msg.u32_at(0);
                let mut body = index.to_le_bytes().to_vec();
                body.extend(VRING_BASE.to_le_bytes());
                Some(body)
            }
            _ if msg.flags & NEED_REPLY != 0 => {
                let status = u64::from(script.refuse == Some(msg.req()));
                Some(status.to_le_bytes().to_vec())
            }
            _ => None,
        };
        let code = msg.code;
        // Logged before answering: once the frontend has its answer, the test sees the request.
        log.lock().unwrap().push(msg);
        if let Some(body) = reply {
            let mut out = code.to_le_bytes().to_vec();
            out.extend((VERSION | REPLY).to_le_bytes());
            out.extend((body.len() as u32).to_le_bytes());
            out.extend(body);
            if stream.write_all(&out).is_err() {
                return;
            }
        }
    }
}

fn receive(stream: &mut UnixStream) -> Option<Msg> {
    let mut header = [0u8; HEADER_LEN];
    let mut fds = [-1 as RawFd; 32];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the iovec covers `header`, which outlives the call; at most its 12 bytes are
    // written.
    let (len, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }.ok()?;
    let files = fds[..nfds]
        .iter()
        // SAFETY: each descriptor was just received with the message and is owned by nobody
        // else: the File takes it.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if len == 0 {
        return None;
    }
    if len < HEADER_LEN {
        stream.read_exact(&mut header[len..]).ok()?;
    }
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
    let mut body = vec![0; word(8) as usize];
    stream.read_exact(&mut body).ok()?;
    Some(Msg {
        code: word(0),
        flags: word(4),
        body,
        files,
    })
}
