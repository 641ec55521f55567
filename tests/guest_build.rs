//! The guest-image recipe: the kernel's cache key follows exactly what goes into the build, and
//! the initramfs /init's command-line parsing (tested on the host with every shell at hand).

use std::path::{Path, PathBuf};
use std::process::Command;

fn resources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("resources")
}

fn kernel_key(linux_dir: &Path) -> String {
    let out = Command::new("bash")
        .arg(linux_dir.join("build-kernel.sh"))
        .arg("--key")
        .output()
        .expect("run build-kernel.sh --key");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-r")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn kernel_cache_key_follows_config_and_patches() {
    let scratch = std::env::temp_dir().join(format!("ember-kernel-key-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let linux = scratch.join("linux");
    copy_dir(&resources().join("linux"), &linux);
    copy_dir(&resources().join("lib"), &scratch.join("lib"));

    let key = kernel_key(&linux);
    assert_eq!(key.len(), 16, "{key}");
    assert_eq!(kernel_key(&linux), key, "the key is stable");
    assert_eq!(
        kernel_key(&resources().join("linux")),
        key,
        "it does not depend on where the recipe is"
    );

    // Any change to the config fragment changes the key…
    let config = linux.join("ember.config");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{original}CONFIG_EMBER_TEST_ONLY=y\n")).unwrap();
    let changed_config = kernel_key(&linux);
    assert_ne!(changed_config, key);
    std::fs::write(&config, &original).unwrap();
    assert_eq!(kernel_key(&linux), key);

    // …and so does any change to a patch, or a new one.
    let patches = linux.join("patches");
    std::fs::write(patches.join("9999-test.patch"), "--- a/x\n+++ b/x\n").unwrap();
    let with_patch = kernel_key(&linux);
    assert_ne!(with_patch, key);
    assert_ne!(with_patch, changed_config);
    std::fs::remove_dir_all(scratch).ok();
}

#[test]
fn init_command_line_parsing() {
    let out = Command::new("sh")
        .arg(resources().join("initramfs").join("test-init.sh"))
        .output()
        .expect("run test-init.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("FAIL"), "{text}");
}
