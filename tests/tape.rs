//! The tape's rules: only tracked work is recorded, one tape per op, scalar losses, a tape
//! that is reusable after backward, a replay from a given output gradient, and checkpointed
//! functions (one entry, the same gradients).

use tuna::{ops, Device, Error, Tape, Tensor};

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape.to_vec(), &Device::Cpu).unwrap()
}

#[test]
fn frozen_work_is_not_recorded() {
    let tape = Tape::new();
    let frozen_w = t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let x = t(&[0.5, -1.0], &[1, 2]);
    let h = ops::matmul(&x, &frozen_w, false, false).unwrap();
    assert!(tape.is_empty(), "ops on untracked tensors must not touch the tape");
    assert!(!h.is_tracked());
    let bias = tape.param(&t(&[0.1, 0.2], &[2]));
    let y = ops::add(&h, &bias).unwrap();
    assert!(y.is_tracked());
    assert_eq!(tape.len(), 1);
    let loss = ops::sum(&y).unwrap();
    let grads = tape.backward(&loss).unwrap();
    assert_eq!(grads.len(), 1, "only the parameter gets a gradient");
    assert_eq!(grads.get(&bias).unwrap().to_vec::<f32>().unwrap(), vec![1.0, 1.0]);
    assert!(grads.get(&frozen_w).is_none());
    assert!(tape.is_empty(), "backward consumes the entries");
}

#[test]
fn gradient_of_a_reused_tensor_accumulates() {
    let tape = Tape::new();
    let x = tape.param(&t(&[3.0], &[1]));
    // y = x*x + 2x  ->  dy/dx = 2x + 2 = 8
    let y = ops::add(&ops::mul(&x, &x).unwrap(), &ops::scale(&x, 2.0).unwrap()).unwrap();
    let grads = tape.backward(&ops::sum(&y).unwrap()).unwrap();
    assert_eq!(grads.get(&x).unwrap().to_vec::<f32>().unwrap(), vec![8.0]);
}

#[test]
fn two_tapes_in_one_op_is_an_error() {
    let (t1, t2) = (Tape::new(), Tape::new());
    let a = t1.param(&t(&[1.0], &[1]));
    let b = t2.param(&t(&[1.0], &[1]));
    match ops::add(&a, &b) {
        Err(Error::Tape(msg)) => assert!(msg.contains("two different tapes"), "{msg}"),
        other => panic!("expected a tape error, got {other:?}"),
    }
}

#[test]
fn backward_needs_a_scalar() {
    let tape = Tape::new();
    let a = tape.param(&t(&[1.0, 2.0], &[2]));
    let y = ops::scale(&a, 2.0).unwrap();
    let e = tape.backward(&y).unwrap_err();
    assert!(e.to_string().contains("one-element loss"), "{e}");
}

#[test]
fn tape_is_reusable_for_a_second_step() {
    let tape = Tape::new();
    let w = tape.param(&t(&[2.0], &[1]));
    for _ in 0..2 {
        let loss = ops::sum(&ops::mul(&w, &w).unwrap()).unwrap();
        let g = tape.backward(&loss).unwrap();
        assert_eq!(g.get(&w).unwrap().to_vec::<f32>().unwrap(), vec![4.0]);
    }
}

#[test]
fn backward_from_replays_with_a_given_output_gradient() {
    let tape = Tape::new();
    let a = tape.param(&t(&[1.0, 2.0, 3.0], &[3]));
    let b = tape.param(&t(&[4.0, -5.0, 6.0], &[3]));
    let y = ops::mul(&a, &b).unwrap();
    // dL/dy = g  ->  dL/da = g∘b, dL/db = g∘a
    let g = tape.backward_from(&y, &t(&[0.5, -1.0, 2.0], &[3])).unwrap();
    assert_eq!(g.get(&a).unwrap().to_vec::<f32>().unwrap(), vec![2.0, 5.0, 12.0]);
    assert_eq!(g.get(&b).unwrap().to_vec::<f32>().unwrap(), vec![0.5, -2.0, 6.0]);
    // A seed of another shape than the output is refused, naming both.
    let y = ops::mul(&a, &b).unwrap();
    let e = tape.backward_from(&y, &t(&[1.0, 1.0], &[2])).unwrap_err();
    assert!(e.to_string().contains("backward_from"), "{e}");
}

#[test]
fn checkpoint_records_one_entry_and_gives_the_same_gradients() {
    // f(x, w, c) = sum((x∘w + w)∘x + c), c frozen.
    let c = t(&[0.25, 0.5, 0.75], &[3]);
    let f = |ins: &[Tensor]| -> tuna::Result<Tensor> {
        let h = ops::add(&ops::mul(&ins[0], &ins[1])?, &ins[1])?;
        ops::sum(&ops::add(&ops::mul(&h, &ins[0])?, &ins[2])?)
    };
    let run = |checkpoint: bool| {
        let tape = Tape::new();
        let x = tape.param(&t(&[1.0, -2.0, 3.0], &[3]));
        let w = tape.param(&t(&[0.5, 1.5, -1.0], &[3]));
        let frozen = c.clone();
        let loss = if checkpoint { ops::checkpoint(&[&x, &w, &frozen], f).unwrap() } else { f(&[x.clone(), w.clone(), frozen.clone()]).unwrap() };
        let entries = tape.len();
        let g = tape.backward(&loss).unwrap();
        assert!(g.get(&frozen).is_none(), "an untracked input gets no gradient");
        (loss.to_vec::<f32>().unwrap(), entries, g.get(&x).unwrap().to_vec::<f32>().unwrap(), g.get(&w).unwrap().to_vec::<f32>().unwrap())
    };
    let (plain, ckpt) = (run(false), run(true));
    assert_eq!(plain.1, 5);
    assert_eq!(ckpt.1, 1, "the checkpointed function is one tape entry");
    assert_eq!((&plain.0, &plain.2, &plain.3), (&ckpt.0, &ckpt.2, &ckpt.3));
    // d/dx (x²w + xw) = 2xw + w, d/dw = x² + x
    assert_eq!(plain.2, vec![1.5, -4.5, -7.0]);
    assert_eq!(plain.3, vec![2.0, 2.0, 12.0]);
}
