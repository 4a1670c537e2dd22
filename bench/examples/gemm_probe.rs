use candle_core::{Device, Tensor, DType};
use std::time::Instant;
fn t(label: &str, f: &dyn Fn() -> Tensor, flops: f64) {
    f();
    let n = 5;
    let s = Instant::now();
    for _ in 0..n { f(); }
    let secs = s.elapsed().as_secs_f64() / n as f64;
    println!("{label:40} {:8.2} ms {:7.1} GFLOP/s", secs * 1e3, flops / secs / 1e9);
}
fn main() {
    let d = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (512, 576), &d).unwrap();
    let w = Tensor::randn(0f32, 1., (1536, 576), &d).unwrap();
    let wt = w.t().unwrap().contiguous().unwrap();
    let e = Tensor::randn(0f32, 1., (49152, 576), &d).unwrap();
    let fl = 2.0 * 512.0 * 576.0 * 1536.0;
    t("x @ w.t() (strided)", &|| x.matmul(&w.t().unwrap()).unwrap(), fl);
    t("x @ wt (contiguous)", &|| x.matmul(&wt).unwrap(), fl);
    t("lm_head x @ e.t()", &|| x.matmul(&e.t().unwrap()).unwrap(), 2.0*512.0*576.0*49152.0);
    let g = Tensor::randn(0f32, 1., (512, 1536), &d).unwrap();
    t("grad_x = g @ w", &|| g.matmul(&w).unwrap(), fl);
    t("grad_w = g.t() @ x", &|| g.t().unwrap().matmul(&x).unwrap(), fl);
    let q = Tensor::randn(0f32, 1., (1, 3, 1536, 64), &d).unwrap();
    let k = Tensor::randn(0f32, 1., (1, 3, 512, 64), &d).unwrap();
    t("scores q @ k.t()", &|| q.matmul(&k.t().unwrap()).unwrap(), 2.0*3.0*1536.0*512.0*64.0);
    let s = Tensor::randn(0f32, 1., (1, 3, 1536, 512), &d).unwrap();
    let m = Tensor::zeros((1536, 512), DType::F32, &d).unwrap();
    t("scores + mask (broadcast)", &|| s.broadcast_add(&m).unwrap(), 1.0);
    t("exp", &|| s.exp().unwrap(), 1.0);
    t("max_keepdim", &|| s.max_keepdim(3).unwrap(), 1.0);
    t("sum_keepdim", &|| s.sum_keepdim(3).unwrap(), 1.0);
    t("broadcast_div", &|| { let r = s.sum_keepdim(3).unwrap(); s.broadcast_div(&r).unwrap() }, 1.0);
    let h = Tensor::randn(0f32, 1., (1, 512, 576), &d).unwrap();
    t("rmsnorm composed", &|| axl::model::ops::rms_norm(&h, &Tensor::ones(576, DType::F32, &d).unwrap(), 1e-5, false).unwrap(), 1.0);
    let a = Tensor::randn(0f32, 1., (1, 512, 1536), &d).unwrap();
    t("silu", &|| a.silu().unwrap(), 1.0);
    t("mul", &|| (&a * &a).unwrap(), 1.0);
    let l = Tensor::randn(0f32, 1., (512, 49152), &d).unwrap();
    t("lse over vocab", &|| axl::model::ops::log_sum_exp_last_dim(&l).unwrap(), 1.0);
}
