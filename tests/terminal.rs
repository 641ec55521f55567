//! The interactive console on a real terminal (a pty made by `script`): raw mode while the guest
//! runs, the Ctrl-A x escape, and the terminal settings restored afterwards.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{ember, kvm_available, micro_guest};

#[test]
fn ctrl_a_x_quits_and_the_terminal_is_restored() {
    if !kvm_available() {
        return;
    }
    let kernel = micro_guest("exit-hang");
    // Inside the pty: record the settings, run ember, record them again.
    let inner = format!(
        "stty -g; {} run --kernel {}; echo \"ember-exit=$?\"; stty -g",
        ember().display(),
        kernel.display()
    );
    let mut child = common::in_pty(&inner);
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&seen).contains("hanging") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "no 'hanging': {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"\x01x").unwrap();
    stdin.flush().unwrap();
    child.stdout = Some(stdout);
    // Keep stdin open until the end: script(1) would end the session on EOF.
    let r = common::finish(child, Duration::from_secs(20));
    drop(stdin);
    let all = format!("{}{}", String::from_utf8_lossy(&seen), r.stdout);
    assert!(all.contains("ember-exit=130"), "{all}");
    assert!(all.contains("stopped from the console (Ctrl-A x)"), "{all}");
    let settings: Vec<&str> = all
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.split(':').count() > 10)
        .collect();
    assert_eq!(settings.len(), 2, "{all}");
    assert_eq!(settings[0], settings[1], "terminal settings changed");
}
