//! Host side of Ember's hybrid vsock (Firecracker's protocol): a host program reaches the guest's
//! vsock port P by connecting to the device's Unix socket, writing `CONNECT P\n` and reading
//! `OK <host port>\n`; from then on the stream is the guest's socket.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The longest answer line accepted: `OK 4294967295\n` and some slack.
const MAX_ANSWER: usize = 32;

/// Opens a stream to guest port `port` through the hybrid-vsock socket at `socket`. Fails when
/// nobody listens on the guest port (the guest resets the connection and Ember closes it).
pub fn connect(socket: &Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket)?;
    // The handshake is short; a guest that never answers must not hold the caller forever.
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let answer = read_line(&mut stream)?;
    if !answer.starts_with("OK ") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("the vsock device answered {answer:?} to CONNECT {port}"),
        ));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// Reads one `\n`-terminated line byte by byte: nothing past it may be consumed, it belongs to the
/// stream.
fn read_line(stream: &mut impl Read) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "nothing listens on that guest port (connection closed)",
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < MAX_ANSWER => line.push(byte[0]),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the vsock device's answer is too long",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connect_does_the_handshake_and_leaves_the_stream_intact() {
        let dir = std::env::temp_dir().join(format!("ember-hybrid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let device = std::thread::spawn(move || {
            for answer in [&b"OK 1073741824\npayload"[..], b""] {
                let (mut peer, _) = listener.accept().unwrap();
                let mut request = [0u8; 13];
                peer.read_exact(&mut request).unwrap();
                assert_eq!(&request, b"CONNECT 1024\n");
                peer.write_all(answer).unwrap();
            }
        });
        let mut stream = connect(&path, 1024).unwrap();
        let mut rest = [0u8; 7];
        stream.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"payload");
        // The second time the "guest" has nobody on the port: closed without an answer.
        assert_eq!(
            connect(&path, 1024).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        device.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
