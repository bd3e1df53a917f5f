//! The parameter set of a transformer, generic over storage `T` (a host tensor, a backend
//! buffer, a gradient buffer, an optimizer moment). One visitor, `for_each`, names every
//! parameter with its Hugging Face tensor name, so loading, saving, gradient checks and the
//! optimizer all walk the same list in the same order.

/// A dense row-major f32 tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape {shape:?} vs len");
        Self { shape, data }
    }
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self { shape, data: vec![0.0; n] }
    }
}

/// One decoder layer. Matrices are stored as in HF: `[out_features, in_features]`.
#[derive(Clone, Debug)]
pub struct LayerWeights<T> {
    pub attn_norm: T,      // [hidden]
    pub wq: T,             // [n_heads * head_dim, hidden]
    pub wk: T,             // [n_kv_heads * head_dim, hidden]
    pub wv: T,             // [n_kv_heads * head_dim, hidden]
    pub wo: T,             // [hidden, n_heads * head_dim]
    pub bq: Option<T>,     // [n_heads * head_dim]      (Qwen2)
    pub bk: Option<T>,     // [n_kv_heads * head_dim]   (Qwen2)
    pub bv: Option<T>,     // [n_kv_heads * head_dim]   (Qwen2)
    pub q_norm: Option<T>, // [head_dim]                (Qwen3)
    pub k_norm: Option<T>, // [head_dim]                (Qwen3)
    pub mlp_norm: T,       // [hidden]
    pub w_gate: T,         // [intermediate, hidden]
    pub w_up: T,           // [intermediate, hidden]
    pub w_down: T,         // [hidden, intermediate]
}

#[derive(Clone, Debug)]
pub struct ModelWeights<T> {
    pub embed: T, // [vocab, hidden]
    pub layers: Vec<LayerWeights<T>>,
    pub final_norm: T,       // [hidden]
    pub lm_head: Option<T>,  // [vocab, hidden]; None when tied to `embed`
}

impl<T> LayerWeights<T> {
    /// Visits the layer's tensors as (suffix after `model.layers.{i}.`, tensor).
    pub fn for_each<'a>(&'a self, mut f: impl FnMut(&'static str, &'a T)) {
        f("input_layernorm.weight", &self.attn_norm);
        f("self_attn.q_proj.weight", &self.wq);
        f("self_attn.k_proj.weight", &self.wk);
        f("self_attn.v_proj.weight", &self.wv);
        f("self_attn.o_proj.weight", &self.wo);
        if let Some(b) = &self.bq {
            f("self_attn.q_proj.bias", b);
        }
        if let Some(b) = &self.bk {
            f("self_attn.k_proj.bias", b);
        }
        if let Some(b) = &self.bv {
            f("self_attn.v_proj.bias", b);
        }
        if let Some(n) = &self.q_norm {
            f("self_attn.q_norm.weight", n);
        }
        if let Some(n) = &self.k_norm {
            f("self_attn.k_norm.weight", n);
        }
        f("post_attention_layernorm.weight", &self.mlp_norm);
        f("mlp.gate_proj.weight", &self.w_gate);
        f("mlp.up_proj.weight", &self.w_up);
        f("mlp.down_proj.weight", &self.w_down);
    }

    pub fn for_each_mut(&mut self, mut f: impl FnMut(&'static str, &mut T)) {
        f("input_layernorm.weight", &mut self.attn_norm);
        f("self_attn.q_proj.weight", &mut self.wq);
        f("self_attn.k_proj.weight", &mut self.wk);
        f("self_attn.v_proj.weight", &mut self.wv);
        f("self_attn.o_proj.weight", &mut self.wo);
        if let Some(b) = &mut self.bq {
            f("self_attn.q_proj.bias", b);
        }
        if let Some(b) = &mut self.bk {
            f("self_attn.k_proj.bias", b);
        }
        if let Some(b) = &mut self.bv {
            f("self_attn.v_proj.bias", b);
        }
        if let Some(n) = &mut self.q_norm {
            f("self_attn.q_norm.weight", n);
        }
        if let Some(n) = &mut self.k_norm {
            f("self_attn.k_norm.weight", n);
        }
        f("post_attention_layernorm.weight", &mut self.mlp_norm);
        f("mlp.gate_proj.weight", &mut self.w_gate);
        f("mlp.up_proj.weight", &mut self.w_up);
        f("mlp.down_proj.weight", &mut self.w_down);
    }

    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> LayerWeights<U> {
        LayerWeights {
            attn_norm: f(&self.attn_norm),
            wq: f(&self.wq),
            wk: f(&self.wk),
            wv: f(&self.wv),
            wo: f(&self.wo),
            bq: self.bq.as_ref().map(&mut f),
            bk: self.bk.as_ref().map(&mut f),
            bv: self.bv.as_ref().map(&mut f),
            q_norm: self.q_norm.as_ref().map(&mut f),
            k_norm: self.k_norm.as_ref().map(&mut f),
            mlp_norm: f(&self.mlp_norm),
            w_gate: f(&self.w_gate),
            w_up: f(&self.w_up),
            w_down: f(&self.w_down),
        }
    }
}

impl<T> ModelWeights<T> {
    /// Visits every parameter with its full HF name, in a fixed order.
    pub fn for_each<'a>(&'a self, mut f: impl FnMut(&str, &'a T)) {
        f("model.embed_tokens.weight", &self.embed);
        for (i, l) in self.layers.iter().enumerate() {
            l.for_each(|s, t| f(&format!("model.layers.{i}.{s}"), t));
        }
        f("model.norm.weight", &self.final_norm);
        if let Some(h) = &self.lm_head {
            f("lm_head.weight", h);
        }
    }

    pub fn for_each_mut(&mut self, mut f: impl FnMut(&str, &mut T)) {
        f("model.embed_tokens.weight", &mut self.embed);
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.for_each_mut(|s, t| f(&format!("model.layers.{i}.{s}"), t));
        }
        f("model.norm.weight", &mut self.final_norm);
        if let Some(h) = &mut self.lm_head {
            f("lm_head.weight", h);
        }
    }

    pub fn map<U>(&self, mut f: impl FnMut(&T) -> U) -> ModelWeights<U> {
        ModelWeights {
            embed: f(&self.embed),
            layers: self.layers.iter().map(|l| l.map(&mut f)).collect(),
            final_norm: f(&self.final_norm),
            lm_head: self.lm_head.as_ref().map(&mut f),
        }
    }
}
