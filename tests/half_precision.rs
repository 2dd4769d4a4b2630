//! The Llama forward in f16 on wgpu (adapters with SHADER_F16; lavapipe has it): every op of
//! the forward reads and writes f16 tensors with f32 math inside its kernel.
//!
//! Reference: the same model on the CPU in f32 with its weights rounded to f16 first, so the
//! only difference left is the rounding of the activations to f16 after each op (about 2^-11
//! relative each, some 30 ops deep here). Bound: 1% of the largest logit, which that rounding
//! stays well inside while a wrong kernel (an index, a missing conversion) is off by the size
//! of the logits themselves.

mod common;

use std::path::Path;

use tuna::nn::{KvCache, Llama};
use tuna::{DType, Device, Tensor};

fn fixture() -> Llama {
    Llama::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fixtures/llama-gqa")).unwrap()
}

fn f16_adapters() -> Vec<Device> {
    common::devices().into_iter().filter(|&d| common::has_f16(d)).collect()
}

fn ids(b: usize, t: usize) -> Tensor {
    Tensor::from_vec_i32((0..b * t).map(|i| ((i * 37 + 11) % 250) as i32).collect(), [b, t]).unwrap()
}

/// Largest |got - want| and largest |want|.
fn error(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let err = got.iter().zip(want).map(|(g, w)| if g.is_nan() { f32::INFINITY } else { (g - w).abs() }).fold(0.0, f32::max);
    (err, want.iter().fold(0.0f32, |m, w| m.max(w.abs())))
}

#[test]
fn f16_forward_on_wgpu_matches_the_cpu_within_f16_rounding() {
    let model = fixture();
    // The reference: f16-rounded weights, f32 activations, on the CPU.
    let rounded = model.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
    let x = ids(2, 13);
    let want = rounded.forward(&x, None).unwrap().to_vec_f32().unwrap();
    for dev in f16_adapters() {
        let half = model.to_device(&dev).unwrap().to_dtype(DType::F16).unwrap();
        let logits = half.forward(&x, None).unwrap();
        assert_eq!((logits.dtype(), logits.device()), (DType::F16, dev));
        let (err, big) = error(&logits.to_vec_f32().unwrap(), &want);
        eprintln!("f16 logits on {dev}: max error {err:.2e}, largest logit {big:.2}, ratio {:.2e}", err / big);
        assert!(err <= 0.01 * big, "f16 logits on {dev}: max error {err} vs largest logit {big}");

        // The loss (the fused head + cross-entropy, f32 logits from f16 operands): within the
        // same relative bound of the reference's.
        let (loss, want_loss) = (half.loss(&x, None).unwrap().to_scalar().unwrap(), rounded.loss(&x, None).unwrap().to_scalar().unwrap());
        assert!((loss - want_loss).abs() <= 0.01 * want_loss.abs(), "f16 loss on {dev}: {loss} vs {want_loss}");

        // With a KV cache (prefill, then two single tokens) the same logits, within the same
        // bound: the cache concatenates f16 keys and values on the device.
        let mut cache = KvCache::new(model.config.num_layers);
        let seq = ids(1, 9);
        let all = seq.to_vec::<i32>().unwrap();
        let mut got = half.forward(&Tensor::from_vec_i32(all[..7].to_vec(), [1, 7]).unwrap(), Some(&mut cache)).unwrap().to_vec_f32().unwrap();
        for &tok in &all[7..] {
            got.extend(half.forward(&Tensor::from_vec_i32(vec![tok], [1, 1]).unwrap(), Some(&mut cache)).unwrap().to_vec_f32().unwrap());
        }
        let want = rounded.forward(&seq, None).unwrap().to_vec_f32().unwrap();
        let (err, big) = error(&got, &want);
        assert!(err <= 0.01 * big, "f16 logits with a KV cache on {dev}: max error {err} vs largest logit {big}");
    }
}

#[test]
fn f16_where_it_is_not_supported_is_a_clear_error() {
    let model = fixture().to_dtype(DType::F16).unwrap();
    let e = model.forward(&ids(1, 4), None).unwrap_err().to_string();
    assert!(e.contains("f16") && e.contains("embedding"), "f16 on the CPU names the op and the dtype: {e}");
    for dev in f16_adapters() {
        // f16 training: f32 adapters (tracked) with f16 activations give an f16 output.
        let tape = tuna::Tape::new();
        let x = Tensor::zeros([2, 8], DType::F16, &dev).unwrap();
        let w = Tensor::zeros([4, 8], DType::F16, &dev).unwrap();
        let a = tape.param(&Tensor::zeros([2, 8], DType::F32, &dev).unwrap());
        let b = tape.param(&Tensor::zeros([4, 2], DType::F32, &dev).unwrap());
        let drop = Some(tuna::ops::Dropout { p: 0.1, seed: 1 });
        assert_eq!(tuna::ops::lora_linear(&x, &w, None, &a, &b, 1.0, drop).unwrap().dtype(), DType::F16);
    }
}

#[test]
fn f16_forward_with_an_nf4_base_matches_the_cpu_within_f16_rounding() {
    // QLoRA's base in an f16 model: the NF4 linears stay NF4 (dequantized in f32 in the GEMM
    // tiles), the rest is f16. Reference: the same NF4 model on the CPU with the other weights
    // rounded to f16; same bound as above.
    let mut model = fixture();
    model.quantize_nf4().unwrap();
    let rounded = model.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap();
    let x = ids(2, 13);
    let want = rounded.forward(&x, None).unwrap().to_vec_f32().unwrap();
    for dev in f16_adapters() {
        let half = model.to_device(&dev).unwrap().to_dtype(DType::F16).unwrap();
        assert_eq!(half.layers[0].q.weight.dtype(), DType::NF4, "the base stays quantized");
        let (err, big) = error(&half.forward(&x, None).unwrap().to_vec_f32().unwrap(), &want);
        eprintln!("f16 NF4 logits on {dev}: max error {err:.2e}, largest logit {big:.2}, ratio {:.2e}", err / big);
        assert!(err <= 0.01 * big, "f16 NF4 logits on {dev}: max error {err} vs largest logit {big}");
    }
}
