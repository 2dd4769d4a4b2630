//! What the tests of the `tuna` binary share: running it, the fixture model, counting data.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::Scratch;

pub fn tuna(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tuna")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures/llama-gqa")
}

/// A fresh scratch folder holding `data.jsonl`: 16 counting examples ("Count i" ->
/// " i+1 i+2"). Returns (folder, data file).
pub fn counting_data(tag: &str) -> (Scratch, PathBuf) {
    let base = Scratch::new(tag);
    let data = write_counting(&base, 16, 2);
    (base, data)
}

/// `dir/data.jsonl`: `n` counting examples, "Count i" -> the next `next` numbers.
pub fn write_counting(dir: &Path, n: usize, next: usize) -> PathBuf {
    let data = dir.join("data.jsonl");
    let lines: String = (0..n)
        .map(|i| {
            let completion: String = (1..=next).map(|d| format!(" {}", i + d)).collect();
            format!("{{\"prompt\": \"Count {i}\", \"completion\": \"{completion}\"}}\n")
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    data
}

/// `tuna perplexity --data DATA --json` with `args`: its mean loss.
pub fn mean_loss(data: &Path, args: &[&str]) -> f64 {
    let mut a = vec!["perplexity", "--data", data.to_str().unwrap(), "--json"];
    a.extend_from_slice(args);
    let (ok, out, err) = tuna(&a);
    assert!(ok, "{err}");
    serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["mean_loss"].as_f64().unwrap()
}
