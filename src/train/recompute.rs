//! Block-level recompute: the forward runs every block untracked and keeps only each block's
//! inputs; the backward re-runs one block at a time under autodiff, with its input as a leaf,
//! and backpropagates the gradient arriving at its output through sum(out · grad_out). Peak
//! activation memory is one block's graph plus the block inputs, instead of every block's
//! graph (burn's own checkpointing is per op and always keeps matmul inputs).
//!
//! Only the blocks carry LoRA pairs (`params::Targets`), so the embedders before them and the
//! final layer after them are constants of the graph: the backward starts at the last block's
//! output and stops at the first block's input.

use anyhow::Result;
use burn::tensor::Tensor;

use crate::engine::cpu::tracked::keeping_probabilities;
use crate::engine::flux::{Embedded, Flux};

use super::batch::{Batch, mse};
use super::objective::{gradients_of, scaled};
use super::params::{PairGrad, TrainableLora, host};

/// Loss of `batch`; adds each pair's gradient into `acc`.
/// The backward starts from `loss · loss_scale` (see `objective::loss_and_grads`).
pub fn backward(
    model: &mut Flux,
    lora: &TrainableLora,
    batch: &Batch,
    acc: &mut [Option<PairGrad>],
    loss_scale: f32,
) -> Result<f32> {
    lora.install(model, "", false);
    let rope = &batch.rope;
    let Embedded { mut img, mut txt, vec } = model.embed(batch.input(batch.noisy()))?;
    let (txt_len, img_len) = (txt.dims()[1], img.dims()[1]);

    // Forward, untracked: keep the inputs of every block.
    let mut double_inputs = Vec::with_capacity(model.double_blocks.len());
    for block in &model.double_blocks {
        double_inputs.push((img.clone(), txt.clone()));
        (img, txt) = block.forward(img, txt, vec.clone(), rope);
    }
    let mut x = Tensor::cat(vec![txt, img], 1);
    let mut single_inputs = Vec::with_capacity(model.single_blocks.len());
    for block in &model.single_blocks {
        single_inputs.push(x.clone());
        x = block.forward(x, vec.clone(), rope);
    }

    // The head: loss from the last block's output, and the gradient there.
    let x = x.autodiff().require_grad();
    let pred = model.final_layer.forward(x.clone().narrow(1, txt_len, img_len), vec.clone());
    let loss = mse(pred, batch.target());
    let grads = gradients_of(scaled(loss.clone(), loss_scale));
    let mut grad_x = x.grad(&grads).expect("the loss depends on the last block's output");
    let loss = host(loss)[0];

    for (i, input) in single_inputs.into_iter().enumerate().rev() {
        let leaves = lora.install(model, &format!("single_blocks.{i}."), true);
        let input = input.autodiff().require_grad();
        let out = keeping_probabilities(|| model.single_blocks[i].forward(input.clone(), vec.clone(), rope));
        let grads = gradients_of((out * grad_x).sum());
        leaves.collect(&grads, acc);
        grad_x = input.grad(&grads).expect("a block's output depends on its input");
        lora.install(model, &format!("single_blocks.{i}."), false);
    }

    let mut grad_txt = grad_x.clone().narrow(1, 0, txt_len);
    let mut grad_img = grad_x.narrow(1, txt_len, img_len);
    for (i, (img, txt)) in double_inputs.into_iter().enumerate().rev() {
        let leaves = lora.install(model, &format!("double_blocks.{i}."), true);
        let (img, txt) = (img.autodiff().require_grad(), txt.autodiff().require_grad());
        let (img_out, txt_out) =
            keeping_probabilities(|| model.double_blocks[i].forward(img.clone(), txt.clone(), vec.clone(), rope));
        let grads = gradients_of((img_out * grad_img).sum() + (txt_out * grad_txt).sum());
        leaves.collect(&grads, acc);
        grad_img = img.grad(&grads).expect("a block's image output depends on its input");
        grad_txt = txt.grad(&grads).expect("a block's text output depends on its input");
        lora.install(model, &format!("double_blocks.{i}."), false);
    }
    Ok(loss)
}
