//! Times the CPU backend (burn flex) on the operations one FLUX step spends its time in,
//! at the medium benchmark size (1024 image + 128 text tokens, hidden 768, 6 heads):
//! `cargo run --release --example cpu_ops`. Used to choose how the model code is written.
use burn::tensor::{Device, Distribution, Tensor, activation};
use std::time::Instant;
fn time<F: FnMut()>(name: &str, mut f: F) {
    f();
    let t = Instant::now();
    for _ in 0..5 {
        f();
    }
    println!("{name}: {:.2} ms", t.elapsed().as_secs_f64() / 5.0 * 1e3);
}
fn main() {
    let d = Device::flex();
    println!("-- matmul [m,k]x[k,n] (transposed: weight stored [n,k] and viewed transposed)");
    for (m, k, n, tr) in [(1152usize, 768usize, 3072usize, false), (1152, 768, 3072, true), (1152, 3072, 768, true)] {
        let a = Tensor::<2>::random([m, k], Distribution::Default, &d);
        let b = if tr {
            Tensor::<2>::random([n, k], Distribution::Default, &d).transpose()
        } else {
            Tensor::<2>::random([k, n], Distribution::Default, &d)
        };
        let t = Instant::now();
        for _ in 0..5 {
            let _ = a.clone().matmul(b.clone()).into_data();
        }
        let s = t.elapsed().as_secs_f64() / 5.0;
        println!("{m}x{k}x{n} transposed={tr}: {:.1} ms, {:.0} GFLOP/s", s * 1e3, 2.0 * (m * k * n) as f64 / s / 1e9);
    }
    let x = Tensor::<3>::random([1, 1152, 3072], Distribution::Default, &d);
    let h = Tensor::<3>::random([1, 1152, 768], Distribution::Default, &d);
    time("gelu_approximate 1152x3072", || {
        let _ = activation::gelu_approximate(x.clone()).into_data();
    });
    time("gelu tanh cube-by-mul", || {
        let c = (2.0f64 / std::f64::consts::PI).sqrt();
        let z = (x.clone() + x.clone() * x.clone() * x.clone() * 0.044715) * c;
        let _ = (x.clone() * (z.tanh() + 1.0) * 0.5).into_data();
    });
    time("gelu sigmoid form", || {
        let c = 2.0 * (2.0f64 / std::f64::consts::PI).sqrt();
        let x2 = x.clone() * x.clone();
        let z = x.clone() * (x2 * (0.044715 * c) + c);
        let _ = (x.clone() * activation::sigmoid(z)).into_data();
    });
    time("gelu atelier (fused)", || {
        let _ = atelier::engine::layers::gelu_tanh(x.clone()).into_data();
    });
    let wide = Tensor::<3>::random([1, 1152, 3072 + 2304], Distribution::Default, &d);
    time("gelu atelier (fused) on a narrow view", || {
        let _ = atelier::engine::layers::gelu_tanh(wide.clone().narrow(2, 2304, 3072)).into_data();
    });
    time("gelu erf 1152x3072", || {
        let _ = activation::gelu(x.clone()).into_data();
    });
    time("add 1152x3072", || {
        let _ = (x.clone() + x.clone()).into_data();
    });
    time("layernorm-ish 1152x768", || {
        let (v, m) = h.clone().var_mean_bias(2);
        let _ = ((h.clone() - m) / (v + 1e-6).sqrt()).into_data();
    });
    let q = Tensor::<4>::random([1, 6, 1152, 128], Distribution::Default, &d);
    time("attention 6x1152x128", || {
        let _ = burn::tensor::module::attention(q.clone(), q.clone(), q.clone(), None, None, Default::default())
            .into_data();
    });
    time("attention atelier (fused, merged heads out)", || {
        let _ = atelier::engine::cpu::attention(&q, &q, &q, false).unwrap().into_data();
    });
    time("attention atelier bf16 (AMX tiles where the CPU has them)", || {
        let _ = atelier::engine::cpu::attention(&q, &q, &q, true).unwrap().into_data();
    });
    time("manual attention", || {
        let s = q.clone().matmul(q.clone().swap_dims(2, 3)) * (1.0 / (128f64).sqrt());
        let p = activation::softmax(s, 3);
        let _ = p.matmul(q.clone()).into_data();
    });
    let cos = Tensor::<5>::random([1, 1, 1152, 64, 1], Distribution::Default, &d);
    time("rope narrow/cat", || {
        let x = q.clone().reshape([1, 6, 1152, 64, 2]);
        let x0 = x.clone().narrow(4, 0, 1);
        let x1 = x.narrow(4, 1, 1);
        let o0 = cos.clone() * x0.clone() - cos.clone() * x1.clone();
        let o1 = cos.clone() * x0 + cos.clone() * x1;
        let _ = Tensor::cat(vec![o0, o1], 4).reshape([1, 6, 1152, 128]).into_data();
    });
    let qs = q.clone().swap_dims(1, 2);
    time("swap+reshape 1152x768", || {
        let _ = qs.clone().reshape([1, 1152, 768]).into_data();
    });
}
