//! Checkpoints and inputs damaged at random — bytes flipped, set to edge values,
//! dropped, repeated or cut off — in the safetensors header, in the archive and in
//! the pickle of a PyTorch checkpoint (re-zipped with its CRC right, so the pickle
//! machine reads it in a sound archive): every reader (`TensorFile::open`, `get`,
//! `get_ids`, `ProjectorWeights::load`) gives a typed error or what the file holds,
//! never a panic. `tests/reference.rs` damages bytes in place and runs the forward;
//! here bytes are also dropped and repeated, so everything after them shifts. Each
//! damaged file is kept where a case fails, to replay it.

use std::io::{Cursor, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use output_projector::rng::Rng;
use output_projector::weights::{projector_prefixes, ProjectorWeights, Selection, TensorFile};

fn golden(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// One to four random edits of `v` within `lo..hi` (the bounds follow the edits).
fn damage(rng: &mut Rng, v: &mut Vec<u8>, lo: usize, hi: usize) {
    for _ in 0..1 + below(rng, 4) {
        let hi = hi.min(v.len());
        if hi <= lo {
            return;
        }
        let i = lo + below(rng, hi - lo);
        match below(rng, 7) {
            0 => v[i] ^= 1 << below(rng, 8),
            // Edge bytes, and the ones JSON and numbers are made of.
            1 => v[i] = [0, 0xff, 0x7f, 0x80, b'9', b'-', b'"', b'}'][below(rng, 8)],
            2 => v[i] = b'0' + below(rng, 10) as u8,
            3 => {
                let n = (1 + below(rng, 8)).min(v.len() - i);
                v.drain(i..i + n);
            }
            4 => {
                let n = 1 + below(rng, 8);
                let at = below(rng, v.len());
                let piece = v[at..(at + n).min(v.len())].to_vec();
                v.splice(i..i, piece);
            }
            5 => v.swap(i, lo + below(rng, hi - lo)),
            _ => v.truncate(i),
        }
    }
}

/// How the readers took the damaged files.
#[derive(Default, Debug)]
struct Tally {
    refused: usize,
    opened: usize,
    tensors_read: usize,
}

/// Every reader on `bytes`, written to `path`; a panic fails the test, with the
/// file kept.
fn read_all(path: &Path, bytes: &[u8], tally: &mut Tally) {
    std::fs::write(path, bytes).expect("writing a damaged file");
    let run = catch_unwind(AssertUnwindSafe(|| match TensorFile::open(path) {
        Err(_) => tally.refused += 1,
        Ok(file) => {
            tally.opened += 1;
            for name in file.names() {
                let _ = file.shape(&name);
                let _ = file.get_ids(&name);
                if file.get(&name).is_ok() {
                    tally.tensors_read += 1;
                }
            }
            let _ = file.metadata();
            let _ = projector_prefixes(&file);
            let _ = ProjectorWeights::load(&file, &Selection::default());
        }
    }));
    if run.is_err() {
        let kept = path.with_extension("panicked");
        let _ = std::fs::copy(path, &kept);
        panic!("a reader panicked on {}", kept.display());
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("damaged_files");
    std::fs::create_dir_all(&dir).expect("creating the scratch folder");
    dir.join(name)
}

#[test]
fn damaged_safetensors_are_errors_not_panics() {
    let mut rng = Rng::new(17);
    for (name, cases) in [
        ("torch_mixed.expected.safetensors", 1500),
        ("model_legacy_b1.io.safetensors", 1500),
        ("model_legacy_b1.weights.safetensors", 400),
    ] {
        let good = golden(name);
        let header = 8 + u64::from_le_bytes(good[..8].try_into().expect("8 bytes")) as usize;
        let path = scratch(name);
        let mut tally = Tally::default();
        for case in 0..cases {
            let mut bad = good.clone();
            // Mostly the JSON header; sometimes its length.
            match case % 4 {
                0 => damage(&mut rng, &mut bad, 0, 8),
                _ => damage(&mut rng, &mut bad, 8, header),
            }
            read_all(&path, &bad, &mut tally);
        }
        // The damage reaches both sides: files refused, and files that open
        // with tensors that still read.
        assert!(
            tally.refused > cases / 10 && tally.tensors_read > 0,
            "{name}: {tally:?}"
        );
    }
}

/// `archive` with the member ending in `member` replaced by `bytes`, every member
/// stored (as `torch.save` writes them) with its CRC computed anew.
fn rezip(archive: &[u8], member: &str, bytes: &[u8]) -> Vec<u8> {
    let mut zip = zip::ZipArchive::new(Cursor::new(archive)).expect("a zip archive");
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let stored = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    for i in 0..zip.len() {
        let mut file = zip.by_index(i).expect("a member");
        let name = file.name().to_string();
        let mut data = Vec::new();
        file.read_to_end(&mut data).expect("reading a member");
        out.start_file(name.as_str(), stored)
            .expect("starting a member");
        let data = if name.ends_with(member) { bytes } else { &data };
        out.write_all(data).expect("writing a member");
    }
    out.finish().expect("finishing the archive").into_inner()
}

#[test]
fn damaged_torch_checkpoints_are_errors_not_panics() {
    let mut rng = Rng::new(29);
    // (Not the big-endian or deflated golden files: they are refused before
    // their pickle is read.)
    for (name, cases) in [("torch_mixed.pt", 2500), ("torch_legacy_b1.pt", 300)] {
        let good = golden(name);
        let mut zip = zip::ZipArchive::new(Cursor::new(&good[..])).expect("a zip archive");
        let pickle_name = zip
            .file_names()
            .find(|n| n.ends_with("/data.pkl"))
            .expect("a data.pkl")
            .to_string();
        let mut pickle = Vec::new();
        zip.by_name(&pickle_name)
            .and_then(|mut f| Ok(f.read_to_end(&mut pickle)?))
            .expect("reading data.pkl");
        let path = scratch(name);
        let mut tally = Tally::default();
        for case in 0..cases {
            let bad = if case % 4 == 0 {
                // The archive itself: its headers, directory and records.
                let mut bad = good.clone();
                let len = bad.len();
                damage(&mut rng, &mut bad, 0, len);
                bad
            } else {
                let mut bad = pickle.clone();
                let len = bad.len();
                damage(&mut rng, &mut bad, 0, len);
                rezip(&good, "/data.pkl", &bad)
            };
            read_all(&path, &bad, &mut tally);
        }
        assert!(
            tally.refused > cases / 10 && tally.tensors_read > 0,
            "{name}: {tally:?}"
        );
    }
}
