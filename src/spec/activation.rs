//! The MLP activation function of a transformer block, by transformers' name.

use serde::{Deserialize, Serialize};

/// The MLP's activation function as transformers names it (`hidden_act` / `activation_function`),
/// because the frameworks implement them differently and that changes what backward keeps:
/// `gelu` (erf) and `gelu_pytorch_tanh` are one fused ATen op that saves only its input, while
/// `gelu_new`, `gelu_fast` and `quick_gelu` are composed of small elementwise ops in Python, each
/// of which saves its own full-width operand. SwiGLU blocks use `silu` on the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Gelu,
    GeluPytorchTanh,
    GeluNew,
    GeluFast,
    QuickGelu,
    Relu,
    Silu,
}

impl Activation {
    pub const ALL: [Activation; 7] = [
        Activation::Gelu,
        Activation::GeluPytorchTanh,
        Activation::GeluNew,
        Activation::GeluFast,
        Activation::QuickGelu,
        Activation::Relu,
        Activation::Silu,
    ];

    /// transformers' name (`ACT2FN` key)
    pub fn as_str(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::GeluPytorchTanh => "gelu_pytorch_tanh",
            Activation::GeluNew => "gelu_new",
            Activation::GeluFast => "gelu_fast",
            Activation::QuickGelu => "quick_gelu",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
        }
    }

    /// The accepted names, comma-separated, for error messages.
    pub fn accepted() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|a| a.as_str()).collect();
        names.join(", ")
    }

    /// Parses transformers' name (case-insensitive); `swish` is transformers' alias of `silu`.
    /// `None` for a name the planner has no measurement of.
    pub fn from_name(name: &str) -> Option<Activation> {
        let n = name.trim().to_ascii_lowercase();
        if n == "swish" {
            return Some(Activation::Silu);
        }
        Self::ALL.into_iter().find(|a| a.as_str() == n)
    }
}

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
