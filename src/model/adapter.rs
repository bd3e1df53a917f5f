//! Low-rank adapters inside the transformer (LoRA, unmerged, as PEFT computes it): a projection
//! with an adapter computes `y = x W^T + s (x A^T) B^T` (`A` `[r, in]`, `B` `[out, r]`,
//! `s = alpha / r`) and its backward gives `dA`, `dB` directly:
//!     u = x A^T  [T, r]      g = dy B  [T, r]
//!     dB += s dy^T u         dA += s g^T x         dx += dy W + s g A
//! With adapters attached the base weights are frozen: the backward computes no weight
//! gradient at all (no `[out, in]` dW, no norm, embedding or lm-head gradient), so LoRA
//! training holds the base weights once and gradients the size of the adapters. `u` is
//! recomputed in the backward from the saved `x` (T x r x in FLOPs, a 1/out share of the
//! projection's) rather than saved.

use super::config::ModelConfig;
use super::transformer::Transformer;
use super::weights::{LayerWeights, ModelWeights};
use crate::backend::Backend;

/// A projection of a decoder layer (`--lora-targets q,k,v,o,gate,up,down`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    /// Every projection, in layer order (the default of `--lora-targets`).
    pub const ALL: [LoraTarget; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim() {
            "q" | "q_proj" => Self::Q,
            "k" | "k_proj" => Self::K,
            "v" | "v_proj" => Self::V,
            "o" | "o_proj" => Self::O,
            "gate" | "gate_proj" => Self::Gate,
            "up" | "up_proj" => Self::Up,
            "down" | "down_proj" => Self::Down,
            _ => return None,
        })
    }
    /// The HF module path inside a decoder layer.
    pub fn module(self) -> &'static str {
        match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        }
    }
    /// (out_features, in_features) of the adapted matrix.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        match self {
            Self::Q => (c.q_dim(), c.hidden_size),
            Self::K | Self::V => (c.kv_dim(), c.hidden_size),
            Self::O => (c.hidden_size, c.q_dim()),
            Self::Gate | Self::Up => (c.intermediate_size, c.hidden_size),
            Self::Down => (c.hidden_size, c.intermediate_size),
        }
    }
    pub fn get<T>(self, l: &LayerWeights<T>) -> &T {
        match self {
            Self::Q => &l.wq,
            Self::K => &l.wk,
            Self::V => &l.wv,
            Self::O => &l.wo,
            Self::Gate => &l.w_gate,
            Self::Up => &l.w_up,
            Self::Down => &l.w_down,
        }
    }
    pub fn get_mut<T>(self, l: &mut LayerWeights<T>) -> &mut T {
        match self {
            Self::Q => &mut l.wq,
            Self::K => &mut l.wk,
            Self::V => &mut l.wv,
            Self::O => &mut l.wo,
            Self::Gate => &mut l.w_gate,
            Self::Up => &mut l.w_up,
            Self::Down => &mut l.w_down,
        }
    }
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// `A` `[r, in]` and `B` `[out, r]` of one adapted projection (or their gradients).
pub struct Adapter<Buf> {
    pub a: Buf,
    pub b: Buf,
}

/// Per decoder layer, the adapter of each projection (indexed by `LoraTarget::index`).
pub type LayerAdapters<Buf> = [Option<Adapter<Buf>>; 7];

/// The adapters of a model: rank, scale `s = alpha / r` and the buffers per layer.
pub struct Adapters<Buf> {
    pub rank: usize,
    pub scale: f64,
    pub layers: Vec<LayerAdapters<Buf>>,
}

impl<Buf> Adapters<Buf> {
    pub fn get(&self, layer: usize, p: LoraTarget) -> Option<&Adapter<Buf>> {
        self.layers.get(layer)?[p.index()].as_ref()
    }
}

/// Where the backward's parameter gradients go.
pub enum Grads<Buf> {
    /// Every weight's gradient (full fine-tuning; no adapters attached).
    Full(ModelWeights<Buf>),
    /// `dA`, `dB` of every adapter, laid out as the model's `Adapters::layers` (the base
    /// weights are frozen).
    Adapters(Vec<LayerAdapters<Buf>>),
}

impl<Buf> Grads<Buf> {
    pub fn as_mut(&mut self) -> GradsMut<'_, Buf> {
        match self {
            Grads::Full(g) => GradsMut::Full(g),
            Grads::Adapters(g) => GradsMut::Adapters(g),
        }
    }
}

/// `Grads` borrowed: what `Transformer::backward` accumulates into.
pub enum GradsMut<'a, Buf> {
    Full(&'a mut ModelWeights<Buf>),
    Adapters(&'a mut [LayerAdapters<Buf>]),
}

impl<B: Backend> Transformer<B> {
    /// Attaches adapters (A and B already on the backend). From now on the forward adds them,
    /// the backward trains only them (`zero_grads_for_training` gives `Grads::Adapters`) and
    /// the base's layer matrices are frozen (`Transformer::freeze`).
    pub fn attach_adapters(&mut self, adapters: Adapters<B::Buf>) {
        assert_eq!(adapters.layers.len(), self.cfg.num_layers, "one adapter set per decoder layer");
        self.adapters = Some(adapters);
        self.freeze();
    }

    pub fn adapters(&self) -> Option<&Adapters<B::Buf>> {
        self.adapters.as_ref()
    }

    /// Zero gradients of what the backward trains: the adapters when attached, else every
    /// weight.
    pub fn zero_grads_for_training(&self) -> Grads<B::Buf> {
        let be = &self.backend;
        match &self.adapters {
            None => Grads::Full(self.zero_grads()),
            Some(ad) => Grads::Adapters(
                ad.layers
                    .iter()
                    .map(|l| l.each_ref().map(|a| a.as_ref().map(|a| Adapter { a: be.zeros(be.len(&a.a)), b: be.zeros(be.len(&a.b)) })))
                    .collect(),
            ),
        }
    }

    /// The weights with every adapter merged in, `W0 + s B A` (the product rounded, then
    /// scaled, then W0 added), on the host: what a merged checkpoint holds.
    pub fn merged_host_weights(&self) -> ModelWeights<super::weights::HostTensor> {
        let mut host = self.host_weights();
        let (Some(ad), be) = (&self.adapters, &self.backend) else { return host };
        for (l, layer) in ad.layers.iter().enumerate() {
            for p in LoraTarget::ALL {
                let Some(a) = &layer[p.index()] else { continue };
                let (out, inp) = p.dims(&self.cfg);
                let mut w = be.zeros(out * inp);
                be.matmul_scaled(&a.b, false, &a.a, false, &mut w, out, inp, ad.rank, ad.scale, false);
                // W0 (as downloaded: a frozen weight may live in bf16 only) + the product, on
                // the host: one fp32 add per value, as the backend's add_assign does it.
                let t = p.get_mut(&mut host.layers[l]);
                for (x, y) in t.data.iter_mut().zip(be.download(&w)) {
                    *x += y;
                }
            }
        }
        host
    }

    /// `y = x W^T` `[t, out]` from `x` `[t, in]` for projection `p` of layer `l`, plus the
    /// adapter's `s (x A^T) B^T` when it has one.
    pub(crate) fn project(&self, l: usize, p: LoraTarget, x: &B::Buf, y: &mut B::Buf, t: usize) {
        let (be, (out, inp)) = (&self.backend, p.dims(&self.cfg));
        be.matmul(x, false, p.get(&self.weights.layers[l]), true, y, t, out, inp, false);
        if let Some((a, r, s)) = self.adapter_of(l, p) {
            let mut u = be.zeros(t * r); // [t, r] = x A^T
            be.matmul(x, false, &a.a, true, &mut u, t, r, inp, false);
            be.matmul_scaled(&u, false, &a.b, true, y, t, out, r, s, true);
        }
    }

    /// Backward of `project` given `dy` `[t, out]` and its saved input `x` `[t, in]`:
    /// `dx (+)= dy W (+ s (dy B) A)` (`accumulate` adds to `dx`), and the parameter gradient:
    /// `dW += dy^T x` into `Grads::Full`, or `dA`, `dB` into `Grads::Adapters`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn project_bwd(&self, l: usize, p: LoraTarget, dy: &B::Buf, x: &B::Buf, dx: &mut B::Buf, accumulate: bool, t: usize, grads: &mut GradsMut<'_, B::Buf>) {
        let (be, (out, inp)) = (&self.backend, p.dims(&self.cfg));
        be.matmul(dy, false, p.get(&self.weights.layers[l]), false, dx, t, inp, out, accumulate);
        if let GradsMut::Full(g) = grads {
            be.matmul(dy, true, x, false, p.get_mut(&mut g.layers[l]), out, inp, t, true);
        }
        let Some((a, r, s)) = self.adapter_of(l, p) else { return };
        let mut ga = match grads {
            GradsMut::Adapters(g) => g[l][p.index()].as_mut(),
            GradsMut::Full(_) => None,
        };
        if let Some(ga) = ga.as_deref_mut() {
            let mut u = be.zeros(t * r); // [t, r] = x A^T, recomputed
            be.matmul(x, false, &a.a, true, &mut u, t, r, inp, false);
            be.matmul_scaled(dy, true, &u, false, &mut ga.b, out, r, t, s, true);
        }
        let mut gb = be.zeros(t * r); // [t, r] = dy B
        be.matmul(dy, false, &a.b, false, &mut gb, t, r, out, false);
        if let Some(ga) = ga {
            be.matmul_scaled(&gb, true, x, false, &mut ga.a, r, inp, t, s, true);
        }
        be.matmul_scaled(&gb, false, &a.a, false, dx, t, inp, r, s, true);
    }

    fn adapter_of(&self, l: usize, p: LoraTarget) -> Option<(&Adapter<B::Buf>, usize, f64)> {
        let ad = self.adapters.as_ref()?;
        Some((ad.get(l, p)?, ad.rank, ad.scale))
    }
}
