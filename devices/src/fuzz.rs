//! Structured random testing of what a guest controls (stable Rust: no libFuzzer here).
//!
//! Each target is a `#[test]` named `fuzz_*` that calls [`run`] with a closure taking a
//! [`Rng`]: the closure builds one case from it (register writes, descriptor chains, lengths,
//! addresses, flags) and plays it against a device, and must not panic; it asserts what must
//! hold whatever the guest did (no write outside guest memory, an image that does not grow, …).
//! Each case's generator is seeded from the run's seed and the case's number, so a case is named
//! by one `u64`, its case seed.
//!
//! `cargo test` runs [`DEFAULT_CASES`] cases of each target from a fixed seed.
//! `resources/fuzz.sh` runs a million or more per target (`EMBER_FUZZ_CASES`, `EMBER_FUZZ_SEED`)
//! and reports cases per second. A failing case prints its case seed; added to
//! `devices/fuzz-corpus/TARGET` (one hexadecimal seed per line, `#` comments), it is played
//! first on every later run, so a bug once found stays tested.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// Cases per target in `cargo test`.
pub(crate) const DEFAULT_CASES: u64 = 2_000;
/// The seed `cargo test` uses.
const DEFAULT_SEED: u64 = 0x454d_4245_525f_465a;

/// SplitMix64: small, fast, and good enough to pick register values and lengths.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True one time in `n`.
    pub(crate) fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// One of `choices`.
    pub(crate) fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.below(choices.len() as u64) as usize]
    }

    /// A value that is often at an edge: 0, all ones, a power of two and its neighbours, or
    /// anything.
    pub(crate) fn edgy_u64(&mut self) -> u64 {
        match self.below(6) {
            0 => 0,
            1 => u64::MAX,
            2 => 1 << self.below(64),
            3 => (1u64 << self.below(64)).wrapping_sub(1),
            4 => self.below(0x1_0000),
            _ => self.next_u64(),
        }
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            bytes.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// The case seeds of a target's corpus file.
fn corpus(target: &str) -> Vec<u64> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz-corpus")
        .join(target);
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(|line| {
            let hex = line.trim_start_matches("0x");
            u64::from_str_radix(hex, 16)
                .unwrap_or_else(|_| panic!("fuzz-corpus/{target}: bad seed {line:?}"))
        })
        .collect()
}

/// Runs `target`'s corpus, then its cases; panics naming the case seed of the first case that
/// panics.
pub(crate) fn run(target: &str, mut case: impl FnMut(&mut Rng)) {
    let cases = env_u64("EMBER_FUZZ_CASES").unwrap_or(DEFAULT_CASES);
    let seed = env_u64("EMBER_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let mut one = |case_seed: u64| {
        let outcome = catch_unwind(AssertUnwindSafe(|| case(&mut Rng::new(case_seed))));
        if let Err(panic) = outcome {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "fuzz target {target}: case seed {case_seed:#x} failed: {why} \
                 (add it to devices/fuzz-corpus/{target})"
            );
        }
    };
    for case_seed in corpus(target) {
        one(case_seed);
    }
    let started = Instant::now();
    let mut seeds = Rng::new(seed);
    for _ in 0..cases {
        one(seeds.next_u64());
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Read by resources/fuzz.sh.
    println!(
        "fuzz {target}: {cases} cases in {elapsed:.1} s, {:.0} cases/s, seed {seed:#x}",
        cases as f64 / elapsed.max(1e-9)
    );
}

/// Plays `writes` random register accesses against `device` at offsets below `window`, in the
/// sizes a guest can use, with reads in between: the register file must answer everything
/// without a panic.
pub(crate) fn poke_registers(
    rng: &mut Rng,
    device: &mut dyn crate::bus::BusDevice,
    window: u64,
    interesting: &[u64],
    writes: usize,
) {
    for _ in 0..writes {
        let offset = if !interesting.is_empty() && !rng.one_in(4) {
            rng.pick(interesting)
        } else {
            rng.below(window)
        };
        let size = rng.pick(&[1usize, 2, 4, 8]);
        if rng.one_in(3) {
            let mut data = vec![0u8; size];
            device.read(offset, &mut data);
        } else {
            let value = rng.edgy_u64().to_le_bytes();
            // The device sees exactly what a guest's access of `size` bytes gives it.
            let _ = device.write(offset, &value[..size]);
        }
    }
}
