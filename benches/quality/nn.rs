//! A small fully connected network with forward and backward passes,
//! trained with Adam on the softmax cross-entropy, written here so that the
//! benchmark needs nothing but the library.
//!
//! Determinism: everything runs on one thread, every sum is taken in a fixed
//! order (8 lanes, then the lanes in order), minibatches follow a shuffle
//! drawn from a named [`Rng`] stream. The same binary therefore gives the
//! same weights, bit for bit, on every run.
//!
//! The activations are the library's ([`Activation::apply`]), so the network
//! trained here and the [`Mlp`] that evaluates it compute the same function
//! (the library sums its dot products in f64, this module in f32: outputs
//! agree to about 1e-6 relative, which can flip only exact ties).

use flatmerge::demo::Rng;
use flatmerge::probe::mlp::{Activation, Linear, Mlp, MlpLayerSpec, MlpSpec};

/// One linear layer and the function after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    /// Input width.
    pub inp: usize,
    /// Output width.
    pub out: usize,
    /// Row-major `[out, inp]`.
    pub w: Vec<f32>,
    /// `[out]`.
    pub b: Vec<f32>,
    /// The function applied to the output.
    pub act: Activation,
}

impl Dense {
    /// He-style initialisation (`N(0, 2/inp)` weights, scaled by `gain`),
    /// zero bias.
    pub fn init(inp: usize, out: usize, act: Activation, gain: f32, rng: &mut Rng) -> Dense {
        let scale = gain * (2.0 / inp as f32).sqrt();
        Dense {
            inp,
            out,
            w: rng.normals(inp * out, scale),
            b: vec![0.0; out],
            act,
        }
    }

    /// The layer as the library's [`Linear`].
    pub fn linear(&self) -> Linear {
        Linear {
            weight: self.w.clone(),
            bias: Some(self.b.clone()),
        }
    }

    /// `‖w‖² + ‖b‖²` in f64.
    pub fn sq_norm(&self) -> f64 {
        self.w
            .iter()
            .chain(&self.b)
            .map(|&v| (v as f64) * (v as f64))
            .sum()
    }
}

/// `Σ a[i] b[i]` in f32, in a fixed order (8 lanes).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut a8 = a.chunks_exact(8);
    let mut b8 = b.chunks_exact(8);
    for (x, y) in (&mut a8).zip(&mut b8) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in a8.remainder().iter().zip(b8.remainder()).enumerate() {
        lanes[l] += x * y;
    }
    ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
}

/// `y += s · x`.
#[inline]
fn axpy(y: &mut [f32], s: f32, x: &[f32]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a += s * b;
    }
}

/// The derivative of an activation at `z`, given `a = f(z)`.
fn derivative(act: Activation, z: f32, a: f32) -> f32 {
    match act {
        Activation::None => 1.0,
        Activation::Relu => {
            if z > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::Gelu => {
            // GELU'(z) = Φ(z) + z φ(z); Φ(z) = GELU(z) / z away from 0.
            let x = z as f64;
            let inv_sqrt_2pi = 0.398_942_280_401_432_7;
            let pdf = inv_sqrt_2pi * (-0.5 * x * x).exp();
            let cdf = if x.abs() < 1e-3 {
                0.5 + x * inv_sqrt_2pi
            } else {
                a as f64 / x
            };
            (cdf + x * pdf) as f32
        }
        Activation::Tanh => 1.0 - a * a,
        Activation::Sigmoid => a * (1.0 - a),
        other => panic!("no derivative for {other:?} in the benchmark trainer"),
    }
}

/// A stack of [`Dense`] layers: the body (all but the last) and the head.
#[derive(Debug, Clone, PartialEq)]
pub struct Net {
    /// Layers, input first; the last is the head.
    pub layers: Vec<Dense>,
}

/// Activations kept for backpropagation.
#[derive(Default)]
struct Cache {
    /// Pre-activations of each layer, `[rows, out]`.
    z: Vec<Vec<f32>>,
    /// Post-activations of each layer, `[rows, out]`.
    a: Vec<Vec<f32>>,
}

impl Net {
    /// A body of `widths` (input first) with `hidden` after each layer, and a
    /// linear head to `classes` outputs.
    pub fn init(widths: &[usize], classes: usize, hidden: Activation, rng: &mut Rng) -> Net {
        let mut layers: Vec<Dense> = widths
            .windows(2)
            .map(|w| Dense::init(w[0], w[1], hidden, 1.0, rng))
            .collect();
        let last = *widths.last().expect("widths");
        layers.push(Dense::init(last, classes, Activation::None, 0.5, rng));
        Net { layers }
    }

    /// The body (every layer but the head).
    pub fn body(&self) -> &[Dense] {
        &self.layers[..self.layers.len() - 1]
    }

    /// The head.
    pub fn head(&self) -> &Dense {
        self.layers.last().expect("a head")
    }

    /// This body with another head.
    pub fn with_head(body: &[Dense], head: &Dense) -> Net {
        let mut layers = body.to_vec();
        layers.push(head.clone());
        Net { layers }
    }

    /// Input width.
    pub fn inp(&self) -> usize {
        self.layers[0].inp
    }

    fn forward_cache(&self, x: &[f32], rows: usize, cache: &mut Cache) {
        cache.z.resize(self.layers.len(), Vec::new());
        cache.a.resize(self.layers.len(), Vec::new());
        for (k, l) in self.layers.iter().enumerate() {
            let (before, after) = cache.a.split_at_mut(k);
            let input: &[f32] = if k == 0 { x } else { &before[k - 1] };
            let z = &mut cache.z[k];
            z.clear();
            z.reserve(rows * l.out);
            for row in input.chunks_exact(l.inp).take(rows) {
                for (o, w) in l.w.chunks_exact(l.inp).enumerate() {
                    z.push(dot(w, row) + l.b[o]);
                }
            }
            let a = &mut after[0];
            a.clear();
            a.extend(z.iter().map(|&v| l.act.apply(v)));
        }
    }

    /// Logits `[rows, classes]` (f32 arithmetic, see the module docs).
    pub fn logits(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut cache = Cache::default();
        self.forward_cache(x, rows, &mut cache);
        cache.a.pop().unwrap_or_default()
    }

    /// The network as the library's [`Mlp`]: layers `body.0`, `body.1`, …
    /// and `head`.
    pub fn to_mlp(&self) -> Mlp {
        let n = self.layers.len();
        let spec = MlpSpec {
            layers: self
                .layers
                .iter()
                .enumerate()
                .map(|(k, l)| {
                    let name = if k + 1 == n {
                        "head".to_string()
                    } else {
                        format!("body.{k}")
                    };
                    MlpLayerSpec::new(&name, l.inp, l.out, l.act)
                })
                .collect(),
        };
        Mlp::new(spec, self.layers.iter().map(Dense::linear).collect()).expect("a valid MLP")
    }
}

/// The body alone as the library's [`Mlp`] (`body.0`, `body.1`, …): what is
/// saved, probed and merged.
pub fn body_mlp(body: &[Dense]) -> Mlp {
    let spec = MlpSpec {
        layers: body
            .iter()
            .enumerate()
            .map(|(k, l)| MlpLayerSpec::new(&format!("body.{k}"), l.inp, l.out, l.act))
            .collect(),
    };
    Mlp::new(spec, body.iter().map(Dense::linear).collect()).expect("a valid MLP")
}

/// A labelled data set: `x` row-major `[n, dim]`, `y` class indices.
#[derive(Debug, Clone, Default)]
pub struct Data {
    /// Input width.
    pub dim: usize,
    /// Inputs.
    pub x: Vec<f32>,
    /// Labels.
    pub y: Vec<usize>,
}

impl Data {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Example `i`'s input.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.dim..(i + 1) * self.dim]
    }
}

/// How to train.
#[derive(Debug, Clone, Copy)]
pub struct TrainConfig {
    /// Adam's step size.
    pub lr: f32,
    /// Passes over the data.
    pub epochs: usize,
    /// Minibatch size.
    pub batch: usize,
}

/// Trains `net` in place with Adam (β = 0.9, 0.999; ε = 1e-8) on the mean
/// cross-entropy; minibatches in the order of a per-epoch shuffle from the
/// stream `stream` of `seed`. Returns the last epoch's mean loss.
pub fn train(net: &mut Net, data: &Data, cfg: &TrainConfig, seed: u64, stream: &str) -> f32 {
    let n = data.len();
    let classes = net.head().out;
    let mut rng = Rng::new(seed, stream);
    let mut order: Vec<usize> = (0..n).collect();
    let sizes: Vec<usize> = net.layers.iter().map(|l| l.w.len() + l.b.len()).collect();
    let mut m: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![0.0; s]).collect();
    let mut v: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![0.0; s]).collect();
    let mut grad: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![0.0; s]).collect();
    let (beta1, beta2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    let mut step = 0i32;
    let mut cache = Cache::default();
    let mut xb = Vec::new();
    let mut last_loss = 0.0;
    for _ in 0..cfg.epochs {
        for i in (1..n).rev() {
            let j = ((rng.next_u64() as u128 * (i as u128 + 1)) >> 64) as usize;
            order.swap(i, j);
        }
        let mut loss_sum = 0f64;
        for batch in order.chunks(cfg.batch) {
            let rows = batch.len();
            xb.clear();
            for &i in batch {
                xb.extend_from_slice(data.row(i));
            }
            net.forward_cache(&xb, rows, &mut cache);
            // Output gradient: (softmax − one-hot) / rows.
            let logits = cache.a.last().expect("layers");
            let mut delta = vec![0f32; rows * classes];
            for (r, &i) in batch.iter().enumerate() {
                let z = &logits[r * classes..(r + 1) * classes];
                let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f64;
                for &v in z {
                    sum += ((v - max) as f64).exp();
                }
                loss_sum += sum.ln() - (z[data.y[i]] - max) as f64;
                for c in 0..classes {
                    let p = (((z[c] - max) as f64).exp() / sum) as f32;
                    let t = if c == data.y[i] { 1.0 } else { 0.0 };
                    delta[r * classes + c] = (p - t) / rows as f32;
                }
            }
            for g in grad.iter_mut() {
                g.iter_mut().for_each(|v| *v = 0.0);
            }
            for k in (0..net.layers.len()).rev() {
                let l = &net.layers[k];
                let input: &[f32] = if k == 0 { &xb } else { &cache.a[k - 1] };
                let (gw, gb) = grad[k].split_at_mut(l.w.len());
                for r in 0..rows {
                    let d = &delta[r * l.out..(r + 1) * l.out];
                    let x = &input[r * l.inp..(r + 1) * l.inp];
                    for (o, &dv) in d.iter().enumerate() {
                        if dv != 0.0 {
                            axpy(&mut gw[o * l.inp..(o + 1) * l.inp], dv, x);
                        }
                        gb[o] += dv;
                    }
                }
                if k > 0 {
                    let prev = &net.layers[k - 1];
                    let mut next = vec![0f32; rows * l.inp];
                    for r in 0..rows {
                        let d = &delta[r * l.out..(r + 1) * l.out];
                        let out = &mut next[r * l.inp..(r + 1) * l.inp];
                        for (o, &dv) in d.iter().enumerate() {
                            if dv != 0.0 {
                                axpy(out, dv, &l.w[o * l.inp..(o + 1) * l.inp]);
                            }
                        }
                    }
                    let (z, a) = (&cache.z[k - 1], &cache.a[k - 1]);
                    for (i, g) in next.iter_mut().enumerate() {
                        *g *= derivative(prev.act, z[i], a[i]);
                    }
                    delta = next;
                }
            }
            step += 1;
            let c1 = 1.0 - beta1.powi(step);
            let c2 = 1.0 - beta2.powi(step);
            for (k, l) in net.layers.iter_mut().enumerate() {
                let nw = l.w.len();
                for (i, p) in l.w.iter_mut().chain(l.b.iter_mut()).enumerate() {
                    let g = grad[k][i];
                    let mk = &mut m[k][i];
                    let vk = &mut v[k][i];
                    *mk = beta1 * *mk + (1.0 - beta1) * g;
                    *vk = beta2 * *vk + (1.0 - beta2) * g * g;
                    *p -= cfg.lr * (*mk / c1) / ((*vk / c2).sqrt() + eps);
                }
                debug_assert_eq!(nw + l.b.len(), m[k].len());
            }
        }
        last_loss = (loss_sum / n.max(1) as f64) as f32;
    }
    last_loss
}

/// The index of the largest value (the first on a tie).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Accuracy of the library's [`Mlp`] on `data` (its forward pass: f64 dot
/// products).
pub fn accuracy(mlp: &Mlp, data: &Data) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let out = mlp.forward_batch(&data.x, data.len());
    let classes = out.len() / data.len();
    let correct = out
        .chunks_exact(classes)
        .zip(&data.y)
        .filter(|(z, &y)| argmax(z) == y)
        .count();
    correct as f64 / data.len() as f64
}
