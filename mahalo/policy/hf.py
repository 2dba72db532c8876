"""A transformers causal LM as a :class:`~mahalo.policy.protocol.Policy`."""

from __future__ import annotations

from typing import Any

import torch

from mahalo.cascade import ATTENTION, Item, Packed, SharedKV, attention_of, pack, unsupported
from mahalo.chat import Messages, generation_prompt_ids, template_end_of_turn_ids
from mahalo.policy.protocol import Policy

# Causal LMs whose forward is exactly ``lm_head(model(...).last_hidden_state)`` (no logit scale,
# soft-capping or bias). On a CPU the policy applies their head itself as ``W @ h.T``: for the few
# rows of a decode step CPU BLAS runs that much faster than ``F.linear`` (``h @ W.T``), and the
# head is the largest matrix of a small model. benchmarks/step_cost.py measured whole decode
# steps 1.1-1.4x faster at 2-16 rows (SmolLM2-135M, 2-core CPU).
PLAIN_HEAD_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)


def stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Token ids that end a response, taken from the model rather than from a list of names.

    The union of ``generation_config.eos_token_id`` (an int or a list: Llama 3.1 lists
    ``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``), the tokenizer's EOS, the token the chat
    template writes after an assistant turn (``<|im_end|>``, ``<|eot_id|>``, Gemma's
    ``<end_of_turn>``, Phi-3's ``<|end|>``). The controller adds the user's ``stop_token_ids``.
    """
    ids = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update(int(i) for i in ([] if eos is None else [eos] if isinstance(eos, int) else eos))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.update(template_end_of_turn_ids(tokenizer))
    return frozenset(ids)


class HFPolicy:
    """A transformers causal LM (``model``, ``tokenizer``) as a :class:`Policy`.

    Its forwards run the model's own layers with one thing replaced: attention reads the
    shared-prefix cache (:func:`mahalo.cascade.cascade_attention`), for that forward only.
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_ids = stop_token_ids(model, tokenizer)
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._head = _plain_head_weight(model) if self.device.type == "cpu" else None  # (V, H) or None
        self._backbone = model.base_model
        self._layers: dict[int, torch.Tensor | None] = {}  # captured layer (1-based) -> its last output (1, N, H)
        self.layer_states: dict[int, torch.Tensor] = {}  # after run: layer -> (n_out, H) at the requested tokens

    def prompt_ids(self, messages: Messages) -> list[int]:
        return generation_prompt_ids(self.tokenizer, messages)

    def unsupported(self) -> str | None:
        """Why the shared-prefix cache would not compute what this model's attention computes."""
        return unsupported(self.model)

    def compile(self) -> None:
        """Compile the backbone's forward (``torch.compile``, dynamic shapes); attention stays eager."""
        self._backbone = torch.compile(self.model.base_model, dynamic=True)

    def capture(self, layers: set[int]) -> None:
        """Keep the outputs of decoder layers ``layers`` (1-based: transformers' ``hidden_states[k]``)
        at the tokens each :meth:`run` returns, in ``layer_states`` (for probes read at every
        token: no extra forward, a reference to a tensor the layer computed anyway)."""
        # One hook per layer per model, whatever number of policies (engines) wrap it: their
        # outputs land in one dict kept on the model, so hooks never pile up.
        outputs = self.model.__dict__.setdefault("_mahalo_layer_outputs", {})
        blocks = self.model.base_model.layers
        for layer in sorted(set(layers) - set(outputs)):
            outputs[layer] = None
            blocks[layer - 1].register_forward_hook(_keeper(outputs, layer))
        self._layers = outputs

    def shared_kv(self) -> SharedKV:
        """An empty cache shaped for this model's layers (each on its layer's device)."""
        config = self.model.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = self.model.base_model.layers[: config.num_hidden_layers]
        devices = [next(layer.parameters()).device for layer in layers]
        return SharedKV(devices, kv_heads, dim, next(self.model.parameters()).dtype)

    @torch.inference_mode()
    def run(self, kv: SharedKV, items: list[Item], extra: list[int] | None = None) -> tuple[torch.Tensor, Packed]:
        """Forward ``items`` packed into one sequence on ``kv`` (their keys and values are written
        into their slots). Returns the backbone's last hidden states (n_out, H) of the tokens the
        items ask for, and the packed forward's description (``extra`` integers come back on the
        device as ``Packed.extra``, sent with the forward's own indices)."""
        input_ids, positions, packed = pack(kv, items, self.device, extra)
        with attention_of(self.model, ATTENTION):
            hidden = self._backbone(input_ids=input_ids, position_ids=positions, use_cache=False,
                                    mahalo_packed=packed).last_hidden_state  # (1, N, H)
        if self._layers:
            self.layer_states = {k: out[0, packed.outputs] for k, out in self._layers.items() if out is not None}
            for k in self._layers:
                self._layers[k] = None
        return hidden[0, packed.outputs], packed

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (n, V) float32 of hidden states (n, H) from :meth:`run`."""
        if self._head is not None:
            return torch.mm(self._head, hidden.T).T.float()
        return self.model.get_output_embeddings()(hidden).float()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _keeper(outputs: dict[int, torch.Tensor | None], layer: int) -> Any:
    """A forward hook that keeps a decoder layer's output in ``outputs[layer]``."""

    def keep(_module: Any, _inputs: Any, output: Any) -> None:
        outputs[layer] = output[0] if isinstance(output, tuple) else output

    return keep


def _plain_head_weight(model: Any) -> torch.Tensor | None:
    """The output head's weight (V, H) when ``model`` is a plain-head architecture, else None."""
    head = model.get_output_embeddings()
    plain = type(model).__name__ in PLAIN_HEAD_ARCHITECTURES and type(head) is torch.nn.Linear
    return head.weight if plain and head.bias is None and hasattr(model, "model") else None


def as_policy(policy: Any) -> Policy:
    """Accept a :class:`Policy` or a ``(causal LM, tokenizer)`` pair.

    Raises:
        ValueError: anything else.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, tuple) and len(policy) == 2:
        return HFPolicy(*policy)
    raise ValueError(
        f"policy must be a mahalo Policy or a (causal LM, tokenizer) pair, got {type(policy).__name__}"
    )
