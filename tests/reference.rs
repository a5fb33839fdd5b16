//! Properties of the CPU reference that the PyTorch fixtures do not pin down:
//! edge cases, error paths, gradients against finite differences.

use std::collections::BTreeMap;

use output_projector::config::{Modality, ProjectorConfig, Variant};
use output_projector::ops::{
    linear_then_layer_norm, Activation, AttentionSpec, Backend, Cols, KeyPaddingMask, LossKind,
    NormAfter, Shaped,
};
use output_projector::projector::Projector;
use output_projector::reference::{RefTensor, Reference};
use output_projector::rng::Rng;
use output_projector::signal::SignalPositions;
use output_projector::tensor::compare;
use output_projector::weights::{ProjectorWeights, Selection, TensorFile};
use output_projector::Error;

fn rand(shape: &[usize], seed: u64) -> RefTensor {
    let n = shape.iter().product();
    RefTensor::new(shape.to_vec(), Rng::new(seed).normal_vec(n)).unwrap()
}

fn alloc(shape: &[usize]) -> RefTensor {
    Reference.alloc(shape).unwrap()
}

/// The error `r` holds: of the kind `kind` accepts, with every word of `words` in
/// its message.
#[track_caller]
fn expect_err<T>(r: Result<T, Error>, kind: fn(&Error) -> bool, words: &[&str]) -> Error {
    let Err(e) = r else {
        panic!("succeeded, but an error naming {words:?} was expected");
    };
    assert!(kind(&e), "an error of another kind: {e:?}");
    let msg = e.to_string();
    for w in words {
        assert!(msg.contains(w), "`{msg}` does not name `{w}`");
    }
    e
}

fn is_shape(e: &Error) -> bool {
    matches!(e, Error::Shape { .. })
}

fn is_invalid(e: &Error) -> bool {
    matches!(e, Error::Invalid(_))
}

fn is_overflow(e: &Error) -> bool {
    matches!(e, Error::Overflow(_))
}

#[test]
fn fully_masked_query_row_gives_zeros_and_others_ignore_masked_keys() {
    let (b, l, h, hd) = (2, 5, 2, 3);
    let q = rand(&[b, l, h * hd], 1);
    let kv = rand(&[b, l, 2 * h * hd], 2);
    // Sequence 0: every key ignored; sequence 1: keys 3 and 4 ignored.
    let ignore: Vec<bool> = (0..b * l).map(|i| i < l || i % l >= 3).collect();
    let mask = KeyPaddingMask::new(b, l, ignore).unwrap();
    let spec = AttentionSpec::new(h, hd);
    let mut out = alloc(&[b, l, h * hd]);
    Reference
        .attention(
            Cols::new(&q, 0),
            Cols::new(&kv, 0),
            Cols::new(&kv, h * hd),
            &spec,
            Some(&mask),
            &mut out,
        )
        .unwrap();
    assert!(out.data()[..l * h * hd].iter().all(|&x| x == 0.0));
    // Sequence 1 equals attention over its first 3 keys only.
    let take = |t: &RefTensor, w: usize| {
        let rows: Vec<f64> = (0..3)
            .flat_map(|j| t.data()[(l + j) * w..(l + j + 1) * w].to_vec())
            .collect();
        RefTensor::new(vec![1, 3, w], rows).unwrap()
    };
    let kv3 = take(&kv, 2 * h * hd);
    let q1 = RefTensor::new(vec![1, l, h * hd], q.data()[l * h * hd..].to_vec()).unwrap();
    let mut want = alloc(&[1, l, h * hd]);
    Reference
        .attention(
            Cols::new(&q1, 0),
            Cols::new(&kv3, 0),
            Cols::new(&kv3, h * hd),
            &spec,
            None,
            &mut want,
        )
        .unwrap();
    let (rel, _) = compare(&out.data()[l * h * hd..], want.data());
    assert!(rel < 1e-15, "{rel}");
}

#[test]
fn single_key_attention_returns_its_value() {
    let q = rand(&[1, 4, 6], 3);
    let kv = rand(&[1, 1, 12], 4);
    let mut out = alloc(&[1, 4, 6]);
    Reference
        .attention(
            Cols::new(&q, 0),
            Cols::new(&kv, 0),
            Cols::new(&kv, 6),
            &AttentionSpec::new(2, 3),
            None,
            &mut out,
        )
        .unwrap();
    for i in 0..4 {
        assert_eq!(&out.data()[i * 6..(i + 1) * 6], &kv.data()[6..12]);
    }
}

#[test]
fn layer_norm_survives_a_huge_mean() {
    // E[x^2] - E[x]^2 would lose every digit here; two passes do not.
    let c = 512;
    let noise = Rng::new(5).normal_vec(c);
    let x = RefTensor::new(vec![1, c], noise.iter().map(|v| 1e8 + v).collect()).unwrap();
    let ones = RefTensor::new(vec![c], vec![1.0; c]).unwrap();
    let zeros = RefTensor::new(vec![c], vec![0.0; c]).unwrap();
    let mut y = alloc(&[1, c]);
    Reference
        .layer_norm(&x, None, &ones, &zeros, 0.0, &mut y, None)
        .unwrap();
    let mean = noise.iter().sum::<f64>() / c as f64;
    let std = (noise.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64).sqrt();
    let want: Vec<f64> = noise.iter().map(|v| (v - mean) / std).collect();
    let (rel, _) = compare(y.data(), &want);
    assert!(rel < 1e-7, "{rel}");
}

#[test]
fn layer_norm_sum_out_without_residual_is_a_copy() {
    let x = rand(&[3, 7], 6);
    let w = rand(&[7], 7);
    let b = rand(&[7], 8);
    let (mut y, mut s) = (alloc(&[3, 7]), alloc(&[3, 7]));
    Reference
        .layer_norm(&x, None, &w, &b, 1e-5, &mut y, Some(&mut s))
        .unwrap();
    assert_eq!(s.data(), x.data());
}

#[test]
fn alignment_loss_gradients_match_finite_differences() {
    let (b, n, d) = (2, 3, 4);
    let pred = rand(&[b, n, d], 9);
    let mut target = rand(&[b, n, d], 10);
    // Token 1 of sequence 0 matches exactly: its l2 gradient is defined as 0.
    target.data_mut()[d..2 * d].copy_from_slice(&pred.data()[d..2 * d]);
    for kind in [LossKind::TokenL2, LossKind::Mse] {
        let (mut loss, mut grad) = (alloc(&[1]), alloc(&[b, n, d]));
        Reference
            .alignment_loss(kind, &pred, &target, &mut loss, &mut grad)
            .unwrap();
        let f = |p: &RefTensor| {
            let (mut l, mut g) = (alloc(&[1]), alloc(&[b, n, d]));
            Reference
                .alignment_loss(kind, p, &target, &mut l, &mut g)
                .unwrap();
            l.data()[0]
        };
        for j in 0..b * n * d {
            if kind == LossKind::TokenL2 && (d..2 * d).contains(&j) {
                assert_eq!(grad.data()[j], 0.0);
                continue;
            }
            let h = 1e-6;
            let (mut p1, mut p2) = (pred.clone(), pred.clone());
            p1.data_mut()[j] += h;
            p2.data_mut()[j] -= h;
            let fd = (f(&p1) - f(&p2)) / (2.0 * h);
            assert!(
                (fd - grad.data()[j]).abs() < 1e-8,
                "{kind:?} {j}: {fd} vs {}",
                grad.data()[j]
            );
        }
    }
}

#[test]
fn shape_mismatches_are_errors_not_panics() {
    let x = rand(&[2, 5], 11);
    let w = rand(&[3, 4], 12);
    let mut y = alloc(&[2, 3]);
    expect_err(
        Reference.linear(&x, &w, None, Activation::None, None, &mut y),
        is_shape,
        &["`linear weight`", "expected shape [3, 5], found [3, 4]"],
    );
    let w = rand(&[3, 5], 12);
    let bad_bias = rand(&[4], 13);
    expect_err(
        Reference.linear(&x, &w, Some(&bad_bias), Activation::Relu, None, &mut y),
        is_shape,
        &["`linear bias`", "expected shape [3], found [4]"],
    );
    let mut bad_out = alloc(&[2, 4]);
    expect_err(
        Reference.linear(&x, &w, None, Activation::Relu, None, &mut bad_out),
        is_shape,
        &["`linear out`", "expected shape [2, 3], found [2, 4]"],
    );
    let empty = rand(&[0, 5], 14);
    let mut y0 = alloc(&[0, 3]);
    expect_err(
        Reference.linear(&empty, &w, None, Activation::None, None, &mut y0),
        is_invalid,
        &["linear", "rows of x must be at least 1"],
    );
    // attention: a column block past the row end, a mask of the wrong size
    let qkv = rand(&[1, 4, 12], 15);
    let mut o = alloc(&[1, 4, 4]);
    let spec = AttentionSpec::new(2, 2);
    expect_err(
        Reference.attention(
            Cols::new(&qkv, 10),
            Cols::new(&qkv, 0),
            Cols::new(&qkv, 4),
            &spec,
            None,
            &mut o,
        ),
        is_invalid,
        &["attention q", "columns 10..14", "width 12"],
    );
    let mask = KeyPaddingMask::new(1, 3, vec![false; 3]).unwrap();
    expect_err(
        Reference.attention(
            Cols::new(&qkv, 0),
            Cols::new(&qkv, 4),
            Cols::new(&qkv, 8),
            &spec,
            Some(&mask),
            &mut o,
        ),
        is_shape,
        &[
            "`attention key padding mask`",
            "expected shape [1, 4], found [1, 3]",
        ],
    );
    expect_err(
        KeyPaddingMask::new(2, 3, vec![false; 5]),
        is_invalid,
        &["key padding mask [2, 3]", "needs 6 entries, 5 given"],
    );
    // layer_norm: negative eps, wrong weight
    let (ln_w, ln_b) = (rand(&[5], 16), rand(&[5], 17));
    let mut yy = alloc(&[2, 5]);
    expect_err(
        Reference.layer_norm(&x, None, &ln_w, &ln_b, -1.0, &mut yy, None),
        is_invalid,
        &["layer_norm", "eps", "-1"],
    );
    expect_err(
        Reference.layer_norm(&x, None, &rand(&[4], 1), &ln_b, 1e-5, &mut yy, None),
        is_shape,
        &["`layer_norm weight`", "expected shape [5], found [4]"],
    );
    // linear_layer_norm: a norm weight of the linear's input width, a sum of
    // another shape
    let w3 = rand(&[3, 5], 18);
    let (n_w, n_b, res) = (rand(&[3], 19), rand(&[3], 20), rand(&[2, 3], 21));
    let (mut ly, mut lout, mut lsum) = (alloc(&[2, 3]), alloc(&[2, 3]), alloc(&[2, 3]));
    let norm = |weight| NormAfter {
        residual: Some(&res),
        weight,
        bias: &n_b,
        eps: 1e-5,
    };
    let none = Activation::None;
    expect_err(
        Reference.linear_layer_norm(&x, &w3, None, none, &mut ly, norm(&ln_w), None, &mut lout),
        is_shape,
        &["`layer_norm weight`", "expected shape [3], found [5]"],
    );
    let mut bad_sum = alloc(&[3, 2]);
    let sum = Some(&mut bad_sum);
    expect_err(
        Reference.linear_layer_norm(&x, &w3, None, none, &mut ly, norm(&n_w), sum, &mut lout),
        is_shape,
        &[
            "`layer_norm sum_out`",
            "expected shape [2, 3], found [3, 2]",
        ],
    );
    let sum = Some(&mut lsum);
    Reference
        .linear_layer_norm(&x, &w3, None, none, &mut ly, norm(&n_w), sum, &mut lout)
        .unwrap();
    // loss: mismatched target
    let (mut l, mut g) = (alloc(&[1]), alloc(&[1, 2, 5]));
    expect_err(
        Reference.alignment_loss(
            LossKind::Mse,
            &rand(&[1, 2, 5], 1),
            &rand(&[1, 2, 4], 2),
            &mut l,
            &mut g,
        ),
        is_shape,
        &[
            "`alignment_loss target`",
            "expected shape [1, 2, 5], found [1, 2, 4]",
        ],
    );
    // gather: positions found for another shape
    let pos = SignalPositions::all(1, 2).unwrap();
    let mut gout = alloc(&[2, 2, 5]);
    expect_err(
        Reference.gather_signal_tokens(&rand(&[2, 3, 5], 1), None, &pos, &mut gout),
        is_invalid,
        &[
            "gather_signal_tokens",
            "positions were found for [1, 2]",
            "hidden is [2, 3, _]",
        ],
    );
    // overflowing shapes
    expect_err(
        Reference.alloc(&[usize::MAX, 2]),
        is_overflow,
        &["element count", "overflows"],
    );
}

fn tiny_config(variant: Variant) -> ProjectorConfig {
    ProjectorConfig {
        variant,
        in_dim: 12,
        d_model: 8,
        heads: 2,
        ffn_dim: 16,
        encoder_layers: 2,
        decoder_layers: 2,
        n_out: 3,
        out_dim: 5,
        n_in: None,
        eps: 1e-5,
    }
}

#[test]
fn batch_rows_are_independent_and_gathering_matches_direct_input() {
    let w = ProjectorWeights::random(tiny_config(Variant::Legacy), None, 3).unwrap();
    let proj = Projector::new(Reference, &w).unwrap();
    let (b, n_in, c) = (3, 4, 12);
    let hidden = rand(&[b, n_in, c], 20);
    let embeds = rand(&[b, n_in, c], 21);
    let all = proj.forward(&hidden, Some(&embeds)).unwrap();
    let per_row = 3 * 5;
    for i in 0..b {
        let one = |t: &RefTensor| {
            RefTensor::new(
                vec![1, n_in, c],
                t.data()[i * n_in * c..(i + 1) * n_in * c].to_vec(),
            )
            .unwrap()
        };
        let y = proj.forward(&one(&hidden), Some(&one(&embeds))).unwrap();
        assert_eq!(y.data(), &all.data()[i * per_row..(i + 1) * per_row]);
    }
    // The same tokens embedded in longer sequences, found by id.
    let t = 9;
    let signal = [100, 101, 102, 103];
    let mut ids = vec![0i64; b * t];
    let mut long_h = vec![0.5; b * t * c];
    let mut long_e = vec![-0.25; b * t * c];
    for i in 0..b {
        for (k, &id) in signal.iter().enumerate() {
            let p = 1 + i + k; // a different start per row
            ids[i * t + p] = id;
            let (src, dst) = ((i * n_in + k) * c, (i * t + p) * c);
            long_h[dst..dst + c].copy_from_slice(&hidden.data()[src..src + c]);
            long_e[dst..dst + c].copy_from_slice(&embeds.data()[src..src + c]);
        }
    }
    let long_h = RefTensor::new(vec![b, t, c], long_h).unwrap();
    let long_e = RefTensor::new(vec![b, t, c], long_e).unwrap();
    let y = proj
        .forward_from_llm(&long_h, Some(&long_e), &ids, &signal)
        .unwrap();
    assert_eq!(y.data(), all.data());
    // The positions found once, a plan reused: the same, and mixing the two
    // kinds of input in one plan is fine.
    let positions = SignalPositions::find(&ids, b, t, &signal).unwrap();
    let mut plan = proj.plan(b, n_in).unwrap();
    for _ in 0..2 {
        let y = proj
            .forward_with_at(&mut plan, &long_h, Some(&long_e), &positions)
            .unwrap();
        assert_eq!(y.data(), all.data());
        let y = proj
            .forward_with(&mut plan, &hidden, Some(&embeds))
            .unwrap();
        assert_eq!(y.data(), all.data());
    }
    let y = proj
        .forward_with_at(&mut plan, &long_h, None, &positions)
        .unwrap();
    assert_ne!(
        y.data(),
        all.data(),
        "without embeds, the hidden states alone"
    );
    // Positions of another count, or another batch, are not this plan's.
    let fewer = SignalPositions::find(&ids, b, t, &signal[..3]).unwrap();
    expect_err(
        proj.forward_with_at(&mut plan, &long_h, Some(&long_e), &fewer),
        is_shape,
        &[
            "`signal token positions`",
            "expected shape [3, 4], found [3, 3]",
        ],
    );
    let one = SignalPositions::find(&ids[..t], 1, t, &signal).unwrap();
    expect_err(
        proj.forward_with_at(&mut plan, &long_h, Some(&long_e), &one),
        is_shape,
        &[
            "`signal token positions`",
            "expected shape [3, 4], found [1, 4]",
        ],
    );
    // Positions of this plan's shape for sequences of another length: the gather says so.
    let short = RefTensor::new(vec![b, t - 1, c], vec![0.0; b * (t - 1) * c]).unwrap();
    let e = proj
        .forward_with_at(&mut plan, &short, None, &positions)
        .unwrap_err();
    assert!(e.to_string().contains("gather_signal_tokens"), "{e}");
    // A missing signal token names the sequence.
    ids[2 * t + 3] = 7;
    let e = proj
        .forward_from_llm(&long_h, Some(&long_e), &ids, &signal)
        .unwrap_err();
    assert!(e.to_string().contains("sequence 2"), "{e}");
}

#[test]
fn checkpoints_round_trip_under_every_prefix_and_variant() {
    let dir = std::env::temp_dir().join(format!("outproj-ref-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for variant in Variant::ALL {
        let w = ProjectorWeights::random(tiny_config(variant), None, 4).unwrap();
        for m in Modality::ALL {
            let prefix = m.checkpoint_prefix(variant);
            let path = dir.join(format!("{}-{}.safetensors", variant.name(), m.name()));
            w.save(&path, prefix).unwrap();
            let file = TensorFile::open(&path).unwrap();
            let sel = Selection {
                heads: Some(2),
                ..Selection::default()
            };
            let back = ProjectorWeights::load(&file, &sel).unwrap();
            assert_eq!(back.tensors(), w.tensors());
            assert_eq!(back.config(), w.config());
            // Asking for this modality checks the preset's shapes, which a tiny model fails.
            let sel = Selection {
                modality: Some(m),
                ..sel
            };
            let e = ProjectorWeights::load(&file, &sel).unwrap_err();
            assert!(e.to_string().contains("preset"), "{e}");
        }
    }
    // Two projectors in one file: auto-detection refuses to guess; a prefix picks.
    let w = ProjectorWeights::random(tiny_config(Variant::Legacy), None, 5).unwrap();
    let mut both = w.state_dict("gen_text_hidden_fcs.0.");
    both.extend(w.state_dict("gen_text_hidden_fcs_audio.0."));
    let path = dir.join("both.safetensors");
    output_projector::weights::save(&path, &both, None).unwrap();
    let file = TensorFile::open(&path).unwrap();
    let e = ProjectorWeights::load(&file, &Selection::default()).unwrap_err();
    assert!(e.to_string().contains("several projectors"), "{e}");
    let sel = Selection {
        prefix: Some("gen_text_hidden_fcs_audio.0.".into()),
        heads: Some(2),
        ..Selection::default()
    };
    assert_eq!(
        ProjectorWeights::load(&file, &sel).unwrap().tensors(),
        w.tensors()
    );
    // Under a wrapper's prefix (DeepSpeed's `module.`) a modality still picks its
    // projector, whose shapes are then checked against the preset.
    let mut wrapped = w.state_dict("module.gen_text_hidden_fcs.0.");
    wrapped.extend(w.state_dict("module.gen_text_hidden_fcs_audio.0."));
    let path = dir.join("wrapped.safetensors");
    output_projector::weights::save(&path, &wrapped, None).unwrap();
    let file = TensorFile::open(&path).unwrap();
    let sel = Selection {
        modality: Some(Modality::Audio),
        heads: Some(2),
        ..Selection::default()
    };
    let e = ProjectorWeights::load(&file, &sel).unwrap_err();
    assert!(e.to_string().contains("legacy audio preset"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A checkpoint damaged in any of a few thousand seeded ways (bytes of the
/// header changed, JSON punctuation and digits swapped in, the file cut short,
/// bytes of the tensors' data changed) either loads and projects a finite
/// output or fails with an error: never a panic, never a non-finite output.
#[test]
fn damaged_checkpoints_load_and_project_or_fail_cleanly() {
    let dir = std::env::temp_dir().join(format!("outproj-damaged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for variant in Variant::ALL {
        let path = dir.join(format!("{}.safetensors", variant.name()));
        ProjectorWeights::random(tiny_config(variant), None, 6)
            .unwrap()
            .save(&path, "gen_text_hidden_fcs.0.")
            .unwrap();
        let good = std::fs::read(&path).unwrap();
        let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let mut rng = Rng::new(7);
        let mut pick = |n: usize| (rng.next_u64() % n as u64) as usize;
        // (loaded, failed) per kind of damage
        let mut outcomes = [(0, 0); 4];
        for i in 0..2000 {
            let mut bytes = good.clone();
            let kind = i % 4;
            match kind {
                0 => {
                    for _ in 0..1 + pick(4) {
                        bytes[8 + pick(header_end - 8)] = pick(256) as u8;
                    }
                }
                1 => {
                    let swap_in = b"0123456789[]{},:\"-eE.";
                    bytes[8 + pick(header_end - 8)] = swap_in[pick(swap_in.len())];
                }
                2 => bytes.truncate(pick(good.len())),
                _ => {
                    for _ in 0..8 {
                        bytes[header_end + pick(good.len() - header_end)] = pick(256) as u8;
                    }
                }
            }
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            // Whether the output is finite, or the error.
            let run = || -> Result<bool, Error> {
                let file = TensorFile::from_static("damaged.safetensors", bytes)?;
                let w = ProjectorWeights::load(&file, &Selection::default())?;
                let proj = Projector::new(Reference, &w)?;
                let y = proj.forward(&rand(&[2, 3, w.config().in_dim], 8), None)?;
                Ok(y.data().iter().all(|v| v.is_finite()))
            };
            let case = format!("{}, damage {kind}, case {i}", variant.name());
            match std::panic::catch_unwind(run) {
                Ok(Ok(true)) => outcomes[kind].0 += 1,
                Ok(Ok(false)) => panic!("{case}: a non-finite output"),
                Ok(Err(_)) => outcomes[kind].1 += 1,
                Err(_) => panic!("{case}: a panic"),
            }
        }
        println!(
            "{}: (loaded, failed) per damage kind {outcomes:?}",
            variant.name()
        );
        // Each kind of damage was caught at least sometimes, and damage to the data
        // alone mostly leaves a loadable (if different) checkpoint.
        assert!(
            outcomes.iter().all(|&(_, failed)| failed > 0),
            "{outcomes:?}"
        );
        assert!(outcomes[3].0 > outcomes[3].1, "{outcomes:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn legacy_state_dict_has_pytorchs_129_names() {
    let c = ProjectorConfig::preset(Modality::Image, Variant::Legacy);
    let names = output_projector::weights::layout(&c);
    assert_eq!(names.len(), 129);
    assert!(names.iter().any(
        |(k, s)| k == "tfm.decoder.layers.3.multihead_attn.in_proj_weight" && s == &vec![1536, 512]
    ));
    assert!(names
        .iter()
        .any(|(k, s)| k == "model.weight" && s == &vec![768, 512]));
}

#[test]
fn a_plan_is_reused_and_belongs_to_its_projector_and_shape() {
    let w = ProjectorWeights::random(tiny_config(Variant::Legacy), None, 5).unwrap();
    let proj = Projector::new(Reference, &w).unwrap();
    let (b, n_in, c) = (2, 3, 12);
    let hidden = rand(&[b, n_in, c], 30);
    let embeds = rand(&[b, n_in, c], 31);
    let want = proj.forward(&hidden, Some(&embeds)).unwrap();
    let other = rand(&[b, n_in, c], 32);
    let want_other = proj.forward(&other, None).unwrap();

    let mut plan = proj.plan(b, n_in).unwrap();
    assert_eq!((plan.batch(), plan.n_in()), (b, n_in));
    for _ in 0..2 {
        let y = proj
            .forward_with(&mut plan, &hidden, Some(&embeds))
            .unwrap();
        assert_eq!(y.data(), want.data());
        // The same plan without embeds: the summed buffer is not read.
        let y = proj.forward_with(&mut plan, &other, None).unwrap();
        assert_eq!(y.data(), want_other.data());
    }

    // A plan of another shape or another projector is an error, not a wrong answer.
    expect_err(
        proj.forward_with(&mut plan, &rand(&[b + 1, n_in, c], 33), None),
        is_shape,
        &["`hidden`", "expected shape [2, 3, 12], found [3, 3, 12]"],
    );
    let twin = Projector::new(Reference, &w).unwrap();
    let e = twin.forward_with(&mut plan, &hidden, None).unwrap_err();
    assert!(e.to_string().contains("another projector"), "{e}");
    expect_err(
        proj.forward_with(&mut plan, &hidden, Some(&rand(&[b, n_in, c + 1], 34))),
        is_shape,
        &["`embeds`", "expected shape [2, 3, 12], found [2, 3, 13]"],
    );
    expect_err(proj.plan(0, n_in), is_invalid, &["batch is 0"]);
    expect_err(proj.plan(b, 0), is_invalid, &["n_in is 0"]);
    expect_err(proj.plan(usize::MAX, n_in), is_overflow, &["overflows"]);
}

/// The reference, saying that every `linear_layer_norm` folds, so that the
/// projector takes its producer-side norms; the default two ops run them, and
/// the linear's output `y` is poisoned afterwards, as a fused kernel leaves
/// it unwritten.
#[derive(Clone, Default)]
struct FoldsEveryNorm {
    calls: std::rc::Rc<std::cell::Cell<usize>>,
}

impl Backend for FoldsEveryNorm {
    type Tensor = RefTensor;
    type Mask = KeyPaddingMask;

    fn name(&self) -> &str {
        "cpu, norms after their linears"
    }
    fn upload(
        &self,
        t: &output_projector::tensor::HostTensor,
    ) -> output_projector::Result<RefTensor> {
        Reference.upload(t)
    }
    fn download(
        &self,
        t: &RefTensor,
    ) -> output_projector::Result<output_projector::tensor::HostTensor> {
        Reference.download(t)
    }
    fn alloc(&self, shape: &[usize]) -> output_projector::Result<RefTensor> {
        Reference.alloc(shape)
    }
    fn upload_mask(&self, mask: &KeyPaddingMask) -> output_projector::Result<KeyPaddingMask> {
        Reference.upload_mask(mask)
    }
    fn linear(
        &self,
        x: &RefTensor,
        w: &RefTensor,
        b: Option<&RefTensor>,
        act: Activation,
        residual: Option<&RefTensor>,
        out: &mut RefTensor,
    ) -> output_projector::Result<()> {
        Reference.linear(x, w, b, act, residual, out)
    }
    fn layer_norm(
        &self,
        x: &RefTensor,
        residual: Option<&RefTensor>,
        weight: &RefTensor,
        bias: &RefTensor,
        eps: f64,
        out: &mut RefTensor,
        sum_out: Option<&mut RefTensor>,
    ) -> output_projector::Result<()> {
        Reference.layer_norm(x, residual, weight, bias, eps, out, sum_out)
    }
    fn attention(
        &self,
        q: Cols<'_, RefTensor>,
        k: Cols<'_, RefTensor>,
        v: Cols<'_, RefTensor>,
        spec: &AttentionSpec,
        mask: Option<&KeyPaddingMask>,
        out: &mut RefTensor,
    ) -> output_projector::Result<()> {
        Reference.attention(q, k, v, spec, mask, out)
    }
    fn alignment_loss(
        &self,
        kind: LossKind,
        pred: &RefTensor,
        target: &RefTensor,
        loss: &mut RefTensor,
        grad: &mut RefTensor,
    ) -> output_projector::Result<()> {
        Reference.alignment_loss(kind, pred, target, loss, grad)
    }
    fn gather_signal_tokens(
        &self,
        hidden: &RefTensor,
        embeds: Option<&RefTensor>,
        positions: &SignalPositions,
        out: &mut RefTensor,
    ) -> output_projector::Result<()> {
        Reference.gather_signal_tokens(hidden, embeds, positions, out)
    }
    fn linear_layer_norm(
        &self,
        x: &RefTensor,
        w: &RefTensor,
        b: Option<&RefTensor>,
        act: Activation,
        y: &mut RefTensor,
        norm: NormAfter<'_, RefTensor>,
        sum_out: Option<&mut RefTensor>,
        out: &mut RefTensor,
    ) -> output_projector::Result<()> {
        linear_then_layer_norm(self, x, w, b, act, y, norm, sum_out, out)?;
        y.data_mut().fill(f64::NAN);
        self.calls.set(self.calls.get() + 1);
        Ok(())
    }
    fn linear_layer_norm_folds(&self, _m: usize, _n: usize, _k: usize) -> bool {
        true
    }
}

#[test]
fn norms_folded_into_the_linears_before_them_change_nothing() {
    let config = tiny_config(Variant::Legacy);
    let w = ProjectorWeights::random_trained(config.clone(), None, 5).unwrap();
    let hidden = rand(&[2, 4, 12], 30);
    let want = Projector::new(Reference, &w)
        .unwrap()
        .forward(&hidden, None)
        .unwrap();
    let be = FoldsEveryNorm::default();
    let proj = Projector::new(be.clone(), &w).unwrap();
    let mut plan = proj.plan(2, 4).unwrap();
    for _ in 0..2 {
        be.calls.set(0);
        let got = proj.forward_with(&mut plan, &hidden, None).unwrap();
        // Bitwise: the same ops in the same order, only issued elsewhere.
        assert_eq!(got.data(), want.data());
        // Each encoder layer's two sub-blocks; the decoder's first layer
        // starts from its prefix (cross-attention and FFN), the others three.
        let (e, d) = (config.encoder_layers, config.decoder_layers);
        assert_eq!(be.calls.get(), 2 * e + 2 + 3 * (d - 1));
    }
}

fn golden(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn is_format(e: &Error) -> bool {
    matches!(e, Error::Format { .. })
}

/// NExT-GPT saves its checkpoint with `torch.save` (an OrderedDict of parameters).
/// Read here, PyTorch's file gives the safetensors fixture's tensors bit for bit, and
/// the projector loaded from it PyTorch's float64 output.
#[test]
fn a_pytorch_checkpoint_reads_as_its_safetensors_twin() {
    let pt = TensorFile::open(golden("torch_legacy_b1.pt")).unwrap();
    let st = TensorFile::open(golden("model_legacy_b1.weights.safetensors")).unwrap();
    let mut names = st.names();
    // The fixture's one tensor outside the projector, which the .pt leaves out.
    assert!(names.remove("llm.embed_tokens.weight"));
    assert_eq!(pt.names(), names);
    for name in &names {
        assert_eq!(pt.shape(name), st.shape(name), "{name}");
        assert_eq!(pt.get(name).unwrap(), st.get(name).unwrap(), "{name}");
    }
    assert!(pt.metadata().is_none());

    let w = ProjectorWeights::load(&pt, &Selection::default()).unwrap();
    let twin = ProjectorWeights::load(&st, &Selection::default()).unwrap();
    assert_eq!(w.tensors(), twin.tensors());
    assert_eq!((w.config(), w.modality()), (twin.config(), twin.modality()));
    let io = TensorFile::open(golden("model_legacy_b1.io.safetensors")).unwrap();
    let up = |n: &str| {
        RefTensor::new(
            io.get(n).unwrap().shape().to_vec(),
            io.get(n).unwrap().to_f64_vec(),
        )
    };
    let y = Projector::new(Reference, &w)
        .unwrap()
        .forward(&up("hidden").unwrap(), Some(&up("embeds").unwrap()))
        .unwrap();
    let want = io.get("conditioning").unwrap();
    assert_eq!(y.shape(), want.shape());
    let (rel, _) = compare(y.data(), &want.to_f64_vec());
    assert!(rel <= 1e-10, "relative error {rel:e}");
}

/// A training-style checkpoint (pickle protocol 4): nested dicts, views of one
/// storage at offsets, every storage type the reader takes, empty and 0-dim tensors,
/// tensors in lists and tuples, a set; what it cannot read (a strided view, a
/// quantized or complex tensor, an object, a name two values share) is an error
/// naming it, only when asked for.
#[test]
fn a_pytorch_checkpoint_of_mixed_content_reads_what_it_can_and_names_the_rest() {
    let pt = TensorFile::open(golden("torch_mixed.pt")).unwrap();
    let want = TensorFile::open(golden("torch_mixed.expected.safetensors")).unwrap();
    assert_eq!(pt.names(), want.names());
    let ints = ["dtypes.i64", "dtypes.i32", "dtypes.u8", "dtypes.bool"];
    for name in want.names() {
        assert_eq!(pt.shape(&name), want.shape(&name), "{name}");
        if ints.contains(&name.as_str()) {
            assert_eq!(
                pt.get_ids(&name).unwrap(),
                want.get_ids(&name).unwrap(),
                "{name}"
            );
            expect_err(
                pt.get(&name),
                |e| matches!(e, Error::DType { .. }),
                &[&name],
            );
        } else {
            assert_eq!(pt.get(&name).unwrap(), want.get(&name).unwrap(), "{name}");
        }
    }
    assert_eq!(pt.shape("empty"), Some(&[0, 4][..]));
    assert_eq!(pt.shape("empty_3_0"), Some(&[3, 0][..]));
    assert_eq!(pt.shape("layers.1.w"), Some(&[3][..]));
    assert!(pt.contains("pair.1") && !pt.contains("tags"));
    assert_eq!(pt.shape("scalar"), Some(&[][..]));
    assert_eq!(pt.get_ids("dtypes.i64").unwrap().1[3], 1 << 40);
    let refused: Vec<String> = serde_json::from_str(&want.metadata().unwrap()["refused"]).unwrap();
    assert_eq!(refused.len(), 6);
    let why = [
        ("refused.transposed", "not contiguous"),
        ("refused.quantized", "_rebuild_qtensor"),
        ("refused.complex", "ComplexFloatStorage"),
        ("args", "argparse.Namespace"),
        ("dup.x", "names two values"),
        ("ids.1", "names two values"),
    ];
    for (name, reason) in why {
        assert!(refused.iter().any(|r| r == name), "{name}");
        assert!(!pt.contains(name));
        expect_err(pt.get(name), is_format, &[name, reason, "torch_mixed.pt"]);
    }
    expect_err(
        pt.get("epoch"),
        |e| matches!(e, Error::MissingKey { .. }),
        &["epoch"],
    );
}

/// What PyTorch 1.6 and later never write is refused with what is wrong and, where
/// there is one, the way out: the legacy format, records compressed by a repacking
/// tool, big-endian storages.
#[test]
fn pytorch_checkpoints_this_reader_does_not_take_are_refused_with_a_way_out() {
    let cases = [
        (
            "torch_legacy_format.pt",
            &["legacy format", "PyTorch 1.6"][..],
        ),
        (
            "torch_repacked.pt",
            &["torch_mixed/byteorder is compressed", "torch.save"],
        ),
        ("torch_big_endian.pt", &["byte order", "\"big\""]),
    ];
    for (name, words) in cases {
        expect_err(TensorFile::open(golden(name)), is_format, words);
    }
}

/// Damage to a PyTorch checkpoint, anywhere (the pickle, the zip's headers and
/// directory, the storages, the length), loads or fails with an error: never a
/// panic. Damage to a storage's bytes is always caught, by its CRC-32.
#[test]
fn damaged_pytorch_checkpoints_load_or_fail_cleanly() {
    let good = std::fs::read(golden("torch_legacy_b1.pt")).unwrap();
    let find = |needle: &[u8]| {
        good.windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    };
    // The pickle follows its local header's name; each storage's bytes are found by
    // its twin's; the central directory starts at the first "PK\1\2".
    let pickle = find(b"torch_legacy_b1/data.pkl") + "torch_legacy_b1/data.pkl".len();
    let storages = find(b"torch_legacy_b1/data/0");
    let directory = find(b"PK\x01\x02");
    let twin = TensorFile::open(golden("model_legacy_b1.weights.safetensors")).unwrap();
    let data: Vec<(usize, usize)> = twin
        .names()
        .iter()
        .filter(|n| n.starts_with("gen_text_hidden_fcs_video.0."))
        .map(|n| {
            let t = twin.get(n).unwrap();
            (find(t.as_bytes()), t.as_bytes().len())
        })
        .collect();
    let mut rng = Rng::new(11);
    let mut pick = |lo: usize, hi: usize| lo + (rng.next_u64() % (hi - lo) as u64) as usize;
    let mut outcomes = [(0, 0); 4];
    for i in 0..1200 {
        let mut bytes = good.clone();
        let kind = i % 4;
        match kind {
            0 => {
                for _ in 0..1 + pick(0, 3) {
                    let at = pick(pickle, storages);
                    bytes[at] = pick(0, 256) as u8;
                }
            }
            1 => {
                let (start, len) = data[pick(0, data.len())];
                bytes[pick(start, start + len)] ^= 1 + pick(0, 255) as u8;
            }
            2 => {
                let at = pick(directory, good.len());
                bytes[at] = pick(0, 256) as u8;
            }
            _ => bytes.truncate(pick(0, good.len())),
        }
        let changed_storage = kind == 1;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        let run = || -> Result<(), Error> {
            let file = TensorFile::from_static("damaged.pt", bytes)?;
            let w = ProjectorWeights::load(&file, &Selection::default())?;
            Projector::new(Reference, &w)?;
            Ok(())
        };
        match std::panic::catch_unwind(run) {
            Ok(Ok(())) if changed_storage => {
                panic!("case {i}: a changed storage byte loaded")
            }
            Ok(Ok(())) => outcomes[kind].0 += 1,
            Ok(Err(e)) => {
                if changed_storage {
                    assert!(e.to_string().contains("CRC-32"), "case {i}: {e}");
                }
                outcomes[kind].1 += 1
            }
            Err(_) => panic!("case {i}, damage {kind}: a panic"),
        }
    }
    println!("(loaded, failed) per damage kind {outcomes:?}");
    assert!(
        outcomes.iter().all(|&(_, failed)| failed > 0),
        "{outcomes:?}"
    );
    // The protocol-4 pickle (frames, memoize, stack globals) damaged anywhere, every
    // name then read: values or errors, never a panic.
    let good = std::fs::read(golden("torch_mixed.pt")).unwrap();
    let (mut opened, mut refused) = (0, 0);
    for i in 0..1500 {
        let mut bytes = good.clone();
        for _ in 0..1 + pick(0, 3) {
            let at = pick(0, good.len());
            bytes[at] = pick(0, 256) as u8;
        }
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        let read_all = || match TensorFile::from_static("damaged.pt", bytes) {
            Ok(file) => {
                for name in file.names() {
                    let _ = file.get(&name);
                    let _ = file.get_ids(&name);
                }
                true
            }
            Err(_) => false,
        };
        match std::panic::catch_unwind(read_all) {
            Ok(true) => opened += 1,
            Ok(false) => refused += 1,
            Err(_) => panic!("case {i}: a panic"),
        }
    }
    println!("torch_mixed.pt damaged: {opened} opened, {refused} refused");
    assert!(opened > 0 && refused > 0);
}

/// Hugging Face's sharded checkpoints: a `*.index.json` whose `weight_map` names the
/// shard of each tensor, shards of either format, read as one file.
#[test]
fn a_sharded_checkpoint_reads_as_one_file() {
    let dir = std::env::temp_dir().join(format!("outproj-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let w = ProjectorWeights::random(tiny_config(Variant::Legacy), None, 9).unwrap();
    let mut state = w.state_dict("gen_text_hidden_fcs.0.");
    let names: Vec<String> = state.keys().cloned().collect();
    let second = state.split_off(&names[names.len() / 2]);
    // A tensor the index does not list stays out of the checkpoint.
    let mut first = state;
    first.insert(
        "llm.unlisted".into(),
        second.values().next().unwrap().clone(),
    );
    let index = |map: &[(&String, &str)]| {
        let map: BTreeMap<&str, &str> = map.iter().map(|(n, f)| (n.as_str(), *f)).collect();
        serde_json::json!({"metadata": {"total_size": 1234}, "weight_map": map}).to_string()
    };
    output_projector::weights::save(dir.join("model-1.safetensors"), &first, None).unwrap();
    output_projector::weights::save(dir.join("model-2.safetensors"), &second, None).unwrap();
    let map: Vec<(&String, &str)> = names
        .iter()
        .map(|n| {
            (
                n,
                if second.contains_key(n) {
                    "model-2.safetensors"
                } else {
                    "model-1.safetensors"
                },
            )
        })
        .collect();
    std::fs::write(dir.join("model.safetensors.index.json"), index(&map)).unwrap();
    let file = TensorFile::open(dir.join("model.safetensors.index.json")).unwrap();
    assert_eq!(file.names(), names.iter().cloned().collect());
    assert!(!file.contains("llm.unlisted") && file.metadata().is_none());
    let sel = Selection {
        heads: Some(2),
        ..Selection::default()
    };
    assert_eq!(
        ProjectorWeights::load(&file, &sel).unwrap().tensors(),
        w.tensors()
    );

    // A PyTorch shard (pytorch_model.bin.index.json names .bin files).
    std::fs::copy(
        golden("torch_legacy_b1.pt"),
        dir.join("pytorch_model-1.bin"),
    )
    .unwrap();
    let pt_names = TensorFile::open(golden("torch_legacy_b1.pt"))
        .unwrap()
        .names();
    let map: Vec<(&String, &str)> = pt_names
        .iter()
        .map(|n| (n, "pytorch_model-1.bin"))
        .collect();
    std::fs::write(dir.join("pytorch_model.bin.index.json"), index(&map)).unwrap();
    let file = TensorFile::open(dir.join("pytorch_model.bin.index.json")).unwrap();
    let twin = TensorFile::open(golden("model_legacy_b1.weights.safetensors")).unwrap();
    let load = |f: &TensorFile| ProjectorWeights::load(f, &Selection::default()).unwrap();
    assert_eq!(load(&file).tensors(), load(&twin).tensors());

    // A shard's tensor the reader cannot take is an error when read, not when opened.
    std::fs::copy(golden("torch_mixed.pt"), dir.join("mixed.bin")).unwrap();
    let (bf16, strided) = (
        String::from("dtypes.bf16"),
        String::from("refused.transposed"),
    );
    let path = dir.join("mixed.bin.index.json");
    std::fs::write(
        &path,
        index(&[(&bf16, "mixed.bin"), (&strided, "mixed.bin")]),
    )
    .unwrap();
    let file = TensorFile::open(&path).unwrap();
    assert_eq!(file.names(), [bf16.clone()].into());
    assert_eq!(file.get(&bf16).unwrap().shape(), &[2, 3]);
    expect_err(
        file.get(&strided),
        is_format,
        &["not contiguous", "mixed.bin"],
    );

    // Indexes that are wrong: each an error naming what, never a file outside the folder.
    let query = names.iter().find(|n| n.ends_with("query_embs")).unwrap();
    let cases: [(String, &[&str]); 8] = [
        (
            index(&[(query, "../model-1.safetensors")]),
            &["not a file beside it", "../model-1"],
        ),
        (index(&[(query, "/etc/passwd")]), &["not a file beside it"]),
        (index(&[(query, "")]), &["not a file beside it"]),
        (
            index(&[(query, "model-2.safetensors")]),
            &["does not hold it", "query_embs"],
        ),
        (
            index(&[(query, "model.safetensors.index.json")]),
            &["model.safetensors.index.json"],
        ),
        (index(&[]), &["names no tensor"]),
        (
            "{\"weight_map\": [1]".into(),
            &["not a valid checkpoint index"],
        ),
        (
            format!("{{\"weight_map\": {{\"{query}\": \"a\", \"{query}\": \"b\"}}}}"),
            &["query_embs` is in the weight_map twice"],
        ),
    ];
    for (i, (text, words)) in cases.into_iter().enumerate() {
        let path = dir.join(format!("bad-{i}.index.json"));
        std::fs::write(&path, text).unwrap();
        expect_err(TensorFile::open(&path), is_format, words);
    }
    let path = dir.join("missing.index.json");
    std::fs::write(&path, index(&[(query, "no-such-shard.safetensors")])).unwrap();
    expect_err(
        TensorFile::open(&path),
        |e| matches!(e, Error::Io { .. }),
        &["no-such-shard.safetensors"],
    );
    std::fs::remove_dir_all(&dir).ok();
}
