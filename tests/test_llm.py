"""LLM glue: tiny offline Qwen2, chat label masks, image splicing, packing, loss, LoRA, generation."""

from __future__ import annotations

import importlib.util
import logging
import os

import pytest
import torch
import torch.nn.functional as F

# The LLM stack is an optional dependency of viq; CI must have it, a bare checkout may skip.
_missing = [m for m in ("transformers", "peft", "tokenizers") if importlib.util.find_spec(m) is None]
if _missing:
    if os.environ.get("CI"):
        pytest.fail(f"LLM dependencies missing in CI: {_missing}", pytrace=False)
    pytest.skip(f"LLM dependencies not installed: {_missing}", allow_module_level=True)

from viq.demo.public_checkpoints import QWEN_CHAT_TEMPLATE  # noqa: E402
from viq.demo.tiny_llm import build_tiny_llm  # noqa: E402
from viq.mllm.adapters import (  # noqa: E402
    generate_answer,
    linear_leaf_names,
    load_causal_lm,
    prepare_llm,
    trainable_parameter_count,
)
from viq.mllm.chat import (  # noqa: E402
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER_ID,
    ChatTokenizer,
    messages_from_llava,
    truncate,
)
from viq.mllm.packing import causal_lm_loss, pack_sequences, splice_image_features  # noqa: E402
from viq.mllm.projector import MMProjector  # noqa: E402

# peft 0.21 calls a transformers API deprecated in 5.x; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

CORPUS = [
    "You are a helpful assistant.",
    "What is in the image? Describe the picture in detail.",
    "A cat sitting on a red mat next to a small dog.",
    "The quick brown fox jumps over the lazy dog. Compare the two images.",
    "There are 3 birds and 12 trees in this photo.",
] * 20

TWO_ROUNDS = [
    {"role": "user", "content": "<image>\nWhat is in the image?"},
    {"role": "assistant", "content": "A cat sitting on a mat."},
    {"role": "user", "content": "Compare <image> and <image> please."},
    {"role": "assistant", "content": "The dog is small."},
]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), CORPUS)


@pytest.fixture(scope="module")
def llm(llm_dir):
    return load_causal_lm(llm_dir)


@pytest.fixture(scope="module")
def chat(llm):
    return ChatTokenizer(llm[1])


def supervised_runs(ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of supervised tokens."""
    runs, cur = [], []
    for i, label in zip(ids.tolist(), labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def official_chunking(tok, text: str) -> list[int]:
    """Official tokenisation: split on <image>, tokenise chunks, -200 between them."""
    ids: list[int] = []
    for k, chunk in enumerate(text.split("<image>")):
        if k:
            ids.append(IMAGE_PLACEHOLDER_ID)
        ids += tok(chunk, add_special_tokens=False)["input_ids"]
    return ids


# ---------------------------------------------------------------------------------------------- build/load


def test_build_is_deterministic_and_loadable(llm_dir, tmp_path, llm):
    state = torch.random.get_rng_state()
    again = build_tiny_llm(tmp_path / "a", CORPUS)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert (again / "tokenizer.json").read_bytes() == (llm_dir / "tokenizer.json").read_bytes()
    model2, _ = load_causal_lm(again)
    for (n, a), (_, b) in zip(llm[0].state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    other, _ = load_causal_lm(build_tiny_llm(tmp_path / "b", CORPUS, seed=1))
    assert not torch.equal(other.model.embed_tokens.weight, model2.model.embed_tokens.weight)
    model, tok = llm
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") != tok.unk_token_id
    assert tok.chat_template == CHATML_TEMPLATE


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(ValueError, match="config.json"):
        load_causal_lm(tmp_path)


def test_load_sets_missing_pad_token(llm_dir, monkeypatch):
    import transformers

    # Qwen2Tokenizer always defaults pad to <|endoftext|>, so simulate a tokenizer without one.
    original = transformers.AutoTokenizer.from_pretrained

    def no_pad(*args, **kwargs):
        tok = original(*args, **kwargs)
        tok.pad_token = None
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_pad)
    model, tok = load_causal_lm(llm_dir)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert model.get_input_embeddings().weight.shape[0] == len(tok)  # no resize


# ---------------------------------------------------------------------------------------------- labels


def test_two_round_labels_exact(chat, llm):
    tok = llm[1]
    conv = chat.encode(TWO_ROUNDS)
    text = chat.render(TWO_ROUNDS)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n")
    # Same ids as the official chunked tokenisation; one placeholder per <image>.
    assert conv.input_ids.tolist() == official_chunking(tok, text)
    assert conv.num_images == 3 and int((conv.input_ids == IMAGE_PLACEHOLDER_ID).sum()) == 3
    # Supervised: exactly each reply + <|im_end|> (no "assistant", no "\n" header or trailing "\n").
    runs = supervised_runs(conv.input_ids, conv.labels)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    assert runs == [enc("A cat sitting on a mat.") + [im_end], enc("The dog is small.") + [im_end]]
    decoded = tok.decode(
        [i for i, label in zip(conv.input_ids.tolist(), conv.labels.tolist()) if label != IGNORE_INDEX]
    )
    assert decoded == "A cat sitting on a mat.<|im_end|>The dog is small.<|im_end|>"
    # Everything before the first answer (system, user, image, header) is ignored, and the header
    # "<|im_start|>assistant\n" ends right before the first supervised token.
    first = int((conv.labels != IGNORE_INDEX).nonzero()[0])
    assert (conv.labels[:first] == IGNORE_INDEX).all()
    header = enc("<|im_start|>assistant\n")
    assert conv.input_ids[first - len(header) : first].tolist() == header
    # The "\n" after each <|im_end|> is not a target.
    for pos in (conv.input_ids == im_end).nonzero().flatten().tolist():
        if pos + 1 < len(conv):
            assert conv.labels[pos + 1] == IGNORE_INDEX
    # Placeholders sit where <image> was: mid-text in round 2 ("Compare <image> and <image> please.").
    ph = (conv.input_ids == IMAGE_PLACEHOLDER_ID).nonzero().flatten().tolist()
    assert conv.input_ids[ph[1] + 1 : ph[2]].tolist() == enc(" and ")
    assert conv.labels[ph].eq(IGNORE_INDEX).all()


def test_text_only(chat, llm):
    msgs = [{"role": "user", "content": "Describe the picture."}, {"role": "assistant", "content": "A dog."}]
    conv = chat.encode(msgs)
    assert conv.num_images == 0 and not (conv.input_ids < 0).any()
    assert llm[1].decode(conv.input_ids[conv.labels != IGNORE_INDEX]) == "A dog.<|im_end|>"
    assert conv.input_ids.tolist() == llm[1](chat.render(msgs), add_special_tokens=False)["input_ids"]


def test_system_prompt_and_llava_format(llm):
    tok = llm[1]
    chat = ChatTokenizer(tok, system_prompt="Be brief.")
    msgs = messages_from_llava([{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Hello"}])
    text = chat.render(msgs)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>Hi")
    # An explicit system message wins over the argument.
    own = [{"role": "system", "content": "Other."}] + msgs
    assert chat.render(own).startswith("<|im_start|>system\nOther.<|im_end|>")
    assert tok.decode(chat.encode(own).labels[chat.encode(own).labels != IGNORE_INDEX]) == "Hello<|im_end|>"
    with pytest.raises(ValueError, match="role"):
        chat.encode([{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="after a user"):
        chat.encode([{"role": "assistant", "content": "x"}])


def test_generation_template_gives_same_labels(chat, llm):
    tagged = CHATML_TEMPLATE.replace(
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}",
        "{%- if message['role'] == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}"
        "{%- generation -%}{{- message['content'] + '<|im_end|>\\n' -}}{%- endgeneration -%}"
        "{%- else -%}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}{%- endif -%}",
    )
    assert tagged != CHATML_TEMPLATE
    gen = ChatTokenizer(llm[1], chat_template=tagged)
    assert gen.span_method == "generation"
    a, b = chat.encode(TWO_ROUNDS), gen.encode(TWO_ROUNDS)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


def test_fallback_template_warns(llm, caplog):
    tok = llm[1]
    saved = tok.chat_template
    try:
        tok.chat_template = None
        with caplog.at_level(logging.WARNING, logger="viq.mllm.chat"):
            fb = ChatTokenizer(tok)
        assert "ChatML" in caplog.text and fb.chat_template == CHATML_TEMPLATE
    finally:
        tok.chat_template = saved
    assert torch.equal(fb.encode(TWO_ROUNDS).labels, ChatTokenizer(tok).encode(TWO_ROUNDS).labels)


# the published Qwen2.5 template ends with a newline after the generation prompt
QWEN25_STYLE = QWEN_CHAT_TEMPLATE + "\n"


def test_qwen25_style_template(llm):
    tok = llm[1]
    chat = ChatTokenizer(tok, chat_template=QWEN25_STYLE)
    assert chat.span_method == "prefix"
    conv = chat.encode(TWO_ROUNDS)
    assert chat.render(TWO_ROUNDS).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    decoded = tok.decode(conv.input_ids[conv.labels != IGNORE_INDEX])
    assert decoded == "A cat sitting on a mat.<|im_end|>The dog is small.<|im_end|>"
    assert conv.input_ids.tolist() == official_chunking(tok, chat.render(TWO_ROUNDS))


def test_non_prefix_stable_template_raises(llm):
    marks_last = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if loop.last %}!{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ValueError, match="prefix-stable"):
        ChatTokenizer(llm[1], chat_template=marks_last).encode(TWO_ROUNDS)


def test_encode_prompt_matches_training_prefix(chat, llm):
    conv = chat.encode(TWO_ROUNDS)
    prompt = chat.encode_prompt(TWO_ROUNDS)  # drops the final answer, adds "<|im_start|>assistant\n"
    last_answer = int((conv.labels != IGNORE_INDEX).nonzero().flatten()[-1])
    start = last_answer
    while conv.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    assert prompt.tolist() == conv.input_ids[:start].tolist()
    assert llm[1].decode(prompt[prompt >= 0]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    # A single-round prompt has one image and ends in the generation prompt.
    p1 = chat.encode_prompt(TWO_ROUNDS[:1])
    assert int((p1 == IMAGE_PLACEHOLDER_ID).sum()) == 1


def test_truncate(chat):
    conv = chat.encode(TWO_ROUNDS)
    ids, labels = conv.input_ids, conv.labels
    assert truncate(ids, labels, len(ids)) is not None
    assert truncate(ids, labels, 10_000, [5, 5, 5])[0].shape == ids.shape
    # Cutting inside the last answer keeps the earlier ones.
    cut = truncate(ids, labels, len(ids) - 3)
    assert cut is not None and len(cut[0]) == len(ids) - 3 and torch.equal(cut[1], labels[: len(ids) - 3])
    # Counting image tokens: 3 images x 40 tokens push the end out; fine as long as no image is cut.
    n = len(ids) - 3 + 3 * 39
    out = truncate(ids, labels, n, [40, 40, 40])
    assert out is not None and len(out[0]) == len(ids) - 3
    ph = (ids == IMAGE_PLACEHOLDER_ID).nonzero().flatten().tolist()
    assert truncate(ids, labels, ph[2] + 1 + 2 * 39 + 10, [40, 40, 40]) is None  # last image cut
    assert truncate(ids, labels, ph[2], [1, 1, 1]) is None  # last image dropped
    first_answer = int((labels != IGNORE_INDEX).nonzero()[0])
    assert truncate(ids[: first_answer + 5], labels[: first_answer + 5], first_answer) is None  # no target left
    with pytest.raises(ValueError, match="placeholders"):
        truncate(ids, labels, 10, [1])


# ---------------------------------------------------------------------------------------------- splice


def test_splice_image_features(llm, chat):
    model = llm[0]
    emb = model.get_input_embeddings()
    conv = chat.encode(TWO_ROUNDS)
    H = emb.weight.shape[1]
    images = [torch.randn(n, H, requires_grad=True) for n in (4, 7, 1)]
    x, y = splice_image_features(emb, conv.input_ids, conv.labels, images)
    L = len(conv) - 3 + 12
    assert x.shape == (L, H) and y.shape == (L,)
    ph = (conv.input_ids == IMAGE_PLACEHOLDER_ID).nonzero().flatten().tolist()
    offset = 0
    for p, img in zip(ph, images):
        q = p + offset
        torch.testing.assert_close(x[q : q + len(img)], img)
        assert (y[q : q + len(img)] == IGNORE_INDEX).all()
        offset += len(img) - 1
    text = y != IGNORE_INDEX
    assert torch.equal(y[text], conv.labels[conv.labels != IGNORE_INDEX])
    torch.testing.assert_close(x[:3], emb.weight[conv.input_ids[:3]])
    x.sum().backward()
    assert all(img.grad is not None for img in images)
    with pytest.raises(ValueError, match="3 image placeholders in input_ids but 2 image embeddings"):
        splice_image_features(emb, conv.input_ids, conv.labels, images[:2])
    x2, y2 = splice_image_features(emb, conv.input_ids, None, images)
    assert y2 is None and x2.shape == (L, H)


# ---------------------------------------------------------------------------------------------- packing


def make_items(model, chat, seed: int = 0):
    """Four spliced conversations of different lengths, with random 'image' embeddings."""
    g = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings()
    H = emb.weight.shape[1]
    convs = [
        TWO_ROUNDS,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A dog."}],
        [{"role": "user", "content": "<image> What is in the image?"}, {"role": "assistant", "content": "Birds."}],
        TWO_ROUNDS[:2],
    ]
    items = []
    with torch.no_grad():
        for msgs in convs:
            conv = chat.encode(msgs)
            sizes = torch.randint(1, 9, (conv.num_images,), generator=g).tolist()
            images = [torch.randn(n, H, generator=g) * 0.02 for n in sizes]
            items.append(splice_image_features(emb, conv.input_ids, conv.labels, images))
    return items


def test_pack_layout(llm, chat):
    items = make_items(llm[0], chat)
    lengths = [len(e) for e, _ in items]
    batch = pack_sequences(items, max_length=max(lengths) + lengths[1] + 1)
    # First fit in order: item 1 joins item 0's row, items 2 and 3 may share a second row.
    assert batch.lengths[0][:2] == lengths[:2]
    for i, (e, lab) in enumerate(items):
        r, s = batch.placements[i]
        n = len(e)
        assert torch.equal(batch.position_ids[r, s : s + n], torch.arange(n))  # restart per conversation
        assert torch.equal(batch.inputs_embeds[r, s : s + n], e)
        assert batch.labels[r, s] == IGNORE_INDEX and torch.equal(batch.labels[r, s + 1 : s + n], lab[1:])
        assert (batch.segment_ids[r, s : s + n] == batch.segment_ids[r, s]).all()
    assert batch.num_loss_tokens == sum(int((lab[1:] != IGNORE_INDEX).sum()) for _, lab in items)
    assert batch.attention_mask is None
    pad = batch.segment_ids == -1
    assert (batch.labels[pad] == IGNORE_INDEX).all() and (batch.inputs_embeds[pad] == 0).all()
    lens = [5, 4, 3, 2]
    fake = [(torch.zeros(n, 2), torch.zeros(n, dtype=torch.long)) for n in lens]
    assert pack_sequences(fake, 8).lengths == [[5, 3], [4, 2]]
    assert pack_sequences(fake, 8, pad_to_multiple_of=16).inputs_embeds.shape == (2, 16, 2)
    with pytest.raises(ValueError, match="truncate"):
        pack_sequences(fake, 4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mask", ["position_ids", "4d"])
def test_packed_logits_equal_separate(llm_dir, chat, attn, mask):
    model, _ = load_causal_lm(llm_dir, attn_implementation=attn)
    model.train()  # train mode on purpose (no dropout in Qwen2 by default): the config's use_cache=True
    # would break packed detection even here if model_inputs() did not pass use_cache=False
    items = make_items(model, chat)
    lengths = [len(e) for e, _ in items]
    batch = pack_sequences(items, max_length=sum(lengths) - 1)  # forces >1 row and padding
    assert len(batch.lengths) == 2 and any(len(r) > 1 for r in batch.lengths)
    with torch.no_grad():
        packed = model(**batch.model_inputs(mask)).logits
        alone = [model(inputs_embeds=e[None], use_cache=False).logits[0] for e, _ in items]
        # Control: without isolation, a conversation that is not first in its row sees its neighbours.
        ones = torch.ones(batch.labels.shape, dtype=torch.long)
        leaky = model(inputs_embeds=batch.inputs_embeds, position_ids=batch.position_ids, attention_mask=ones).logits
    for i, (e, _) in enumerate(items):
        r, s = batch.placements[i]
        torch.testing.assert_close(packed[r, s : s + len(e)], alone[i], atol=1e-5, rtol=1e-5)
        if s > 0:
            assert (leaky[r, s : s + len(e)] - alone[i]).abs().max() > 1e-3
    # Loss: token-weighted mean of the separate losses.
    out = causal_lm_loss(packed, batch.labels)
    sep = [causal_lm_loss(a[None], lab[None]) for a, (_, lab) in zip(alone, items)]
    assert int(out.num_tokens) == batch.num_loss_tokens == sum(int(o.num_tokens) for o in sep)
    expected = sum(o.loss_sum for o in sep) / sum(o.num_tokens for o in sep)
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_causal_lm_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :3] = IGNORE_INDEX
    out = causal_lm_loss(logits, labels)
    ref = F.cross_entropy(logits[:, :-1].float().reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss_sum, ref)
    assert int(out.num_tokens) == 8 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref / 8)
    empty = causal_lm_loss(logits, torch.full_like(labels, IGNORE_INDEX))
    assert empty.loss.item() == 0 and int(empty.num_tokens) == 0
    empty.loss.backward()  # stays in the graph


# ---------------------------------------------------------------------------------------------- prepare


def test_prepare_llm_modes(llm_dir, llm):
    total = sum(p.numel() for p in llm[0].parameters())
    assert linear_leaf_names(llm[0]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    frozen = prepare_llm(load_causal_lm(llm_dir)[0], "frozen")
    assert trainable_parameter_count(frozen) == 0
    full = prepare_llm(load_causal_lm(llm_dir)[0], "full")
    assert trainable_parameter_count(full) == total
    for mode in ("lora", "dora"):
        m = prepare_llm(load_causal_lm(llm_dir)[0], mode, r=4, alpha=8)
        names = [n for n, p in m.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)
        assert trainable_parameter_count(m) == sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
        adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
        assert adapted == set(linear_leaf_names(llm[0]))
        assert any("lora_magnitude_vector" in n for n in names) == (mode == "dora")
    with pytest.raises(ValueError, match="mode"):
        prepare_llm(llm[0], "half")


def test_lora_step_changes_only_lora_params(llm_dir, chat):
    model = prepare_llm(load_causal_lm(llm_dir)[0], "lora", r=4, alpha=8, dropout=0.0)
    model.train()
    items = make_items(model, chat)
    batch = pack_sequences(items, max_length=256)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = causal_lm_loss(model(**batch.model_inputs()).logits, batch.labels).loss
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        if "lora_" in n:
            assert changed, n
        else:
            assert not changed, n
    # The peft-wrapped model still generates from spliced embeddings.
    prompt = chat.encode_prompt(TWO_ROUNDS[:1])
    image = [torch.randn(5, model.get_input_embeddings().weight.shape[1])]
    assert isinstance(generate_answer(model.eval(), chat, prompt, image, max_new_tokens=3), str)


# ---------------------------------------------------------------------------------------------- generate


def test_generate_answer(llm, chat):
    model, _ = llm
    torch.manual_seed(0)
    proj = MMProjector(8, model.config.hidden_size)
    msgs = [{"role": "user", "content": "<image>\nWhat is in the image?"}]
    prompt = chat.encode_prompt(msgs)
    with torch.no_grad():
        images = proj([torch.randn(6, 8)], [(2, 3)])
    a = generate_answer(model, chat, prompt, images, max_new_tokens=8)
    b = generate_answer(model, chat, prompt, images, max_new_tokens=8)
    assert isinstance(a, str) and a == b
    assert "<|im_start|>" not in a
