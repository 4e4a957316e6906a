"""Chat template tests. Oracles (tests/data/tokenizer_refs/chat.json, written by
tests/reference/make_tokenizer_refs.py): llama-cpp-python's Jinja2ChatFormatter for SmolLM2's
own template, llama.cpp's built-in `gemma` and `chatml` formats for the fallbacks, and
llama.cpp's tokenization of each rendered prompt."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from qpack.runtime import chat
from qpack.runtime.chat import ChatTemplate, ChatTemplateError
from qpack.runtime.errors import QpackError
from qpack.runtime.gguf import open_gguf
from qpack.runtime.tokenizer import Tokenizer

REFS = json.loads((Path(__file__).parent / "data" / "tokenizer_refs" / "chat.json").read_text())
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    md = open_gguf(smollm2_path).metadata
    return md, Tokenizer.from_metadata(md)


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    md = open_gguf(gemma3_path).metadata
    return md, Tokenizer.from_metadata(md)


@pytest.mark.parametrize("index", range(len(REFS["smollm2"])))
def test_smollm2_template_renders_as_jinja2_chat_formatter(smollm2, index):
    ref = REFS["smollm2"][index]
    md, tok = smollm2
    template = ChatTemplate.from_metadata(md, tok)
    assert template.source == md["tokenizer.chat_template"]
    text = template.render(ref["messages"], add_generation_prompt=ref["add_generation_prompt"])
    assert text == ref["rendered"]
    assert template.encode(ref["messages"], ref["add_generation_prompt"]) == ref["ids"]


def test_smollm2_template_is_chatml_with_default_system_prompt(smollm2):
    md, tok = smollm2
    text = ChatTemplate.from_metadata(md, tok).render(USER)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("index", range(len(REFS["builtin"])))
def test_gemma_fallback_matches_llama_cpp_builtin(gemma3, index):
    ref = REFS["builtin"][index]
    md, tok = gemma3
    assert "tokenizer.chat_template" not in md  # Gemma 3 270M's GGUF has no template
    template = ChatTemplate.from_metadata(md, tok)
    assert "gemma" in template.name
    text = template.render(ref["messages"], add_generation_prompt=ref["add_generation_prompt"])
    assert text == ref["gemma"]
    assert template.encode(ref["messages"], ref["add_generation_prompt"]) == ref["gemma_ids"]


@pytest.mark.parametrize("index", range(len(REFS["builtin"])))
def test_chatml_fallback_matches_llama_cpp_builtin(smollm2, index):
    ref = REFS["builtin"][index]
    _, tok = smollm2  # no <start_of_turn> in this vocabulary: ChatML
    template = ChatTemplate.fallback(tok)
    assert "chatml" in template.name
    assert template.render(ref["messages"], ref["add_generation_prompt"]) == ref["chatml"]


def test_gemma_fallback_puts_system_into_first_user_turn(gemma3):
    md, tok = gemma3
    messages = [{"role": "system", "content": " Be brief. "}, *USER]
    text = ChatTemplate.from_metadata(md, tok).render(messages)
    assert text == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode(text, parse_special=True)
    assert ids[:2] == [tok.bos_id, tok.token_to_id("<start_of_turn>")]
    assert ids.count(tok.bos_id) == 1


def test_bos_in_template_is_not_doubled(gemma3):
    _, tok = gemma3
    template = ChatTemplate("{{ bos_token }}{{ messages[0]['content'] }}", tok)
    assert template.render(USER) == "Hi"
    assert template.encode(USER).count(tok.bos_id) == 1


def test_bos_kept_when_the_tokenizer_does_not_add_it(smollm2):
    _, tok = smollm2
    assert not tok.add_bos
    assert ChatTemplate("{{ bos_token }}x", tok).render(USER) == "<|im_start|>x"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ().__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__.__mro__[1].__subclasses__()[0].__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.system('touch /tmp/qpack-pwned') }}",
        "{{ self.__init__.__globals__.__builtins__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.append({'role': 'x'}) }}",
        "{% set d = {} %}{{ d.update(a=1) }}",
        "{{ 'x' * 10**10 }}",
        "{{ [1] * 10**9 }}",
        "{{ 2 ** 100000000 }}",
        "{{ range(10**12) | list }}",
        "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
    ],
)
def test_sandbox_refuses_malicious_templates(smollm2, source, tmp_path):
    _, tok = smollm2
    template = ChatTemplate(source, tok, name="evil")
    with pytest.raises(ChatTemplateError, match="evil"):
        template.render(USER)
    assert not Path("/tmp/qpack-pwned").exists()


def test_raise_exception_surfaces_as_qpack_error(smollm2):
    _, tok = smollm2
    source = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('System first!') }}{% endif %}"
    )
    with pytest.raises(QpackError, match="System first!"):
        ChatTemplate(source, tok).render(USER)


def test_template_errors_are_qpack_errors(smollm2):
    _, tok = smollm2
    with pytest.raises(ChatTemplateError, match="does not compile.*line 1"):
        ChatTemplate("{% for m in messages %}", tok)
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        ChatTemplate("{{ 1 / 0 }}", tok).render(USER)
    with pytest.raises(ChatTemplateError, match="tokenizer.chat_template"):
        ChatTemplate.from_metadata({"tokenizer.chat_template": 42}, tok)


def test_hf_environment_features(smollm2):
    _, tok = smollm2
    source = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}|{{ strftime_now('%Y') }}|{{ eos_token }}\n"
        "{% endfor %}\n"
        "  {% if add_generation_prompt %}gen{% endif %}"
    )
    messages = [{"role": "user", "content": "café <b>"}, {"role": "user", "content": "2"}]
    text = ChatTemplate(source, tok).render(messages)
    year = str(datetime.datetime.now().year)
    # tojson keeps non-ASCII and HTML; trim_blocks eats the newline after a block tag and
    # lstrip_blocks the spaces before one
    assert text == f'{{"role": "user", "content": "café <b>"}}|{year}|<|im_end|>\ngen'


def test_messages_are_normalized(smollm2):
    _, tok = smollm2
    template = ChatTemplate.fallback(tok)
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert template.render(parts, add_generation_prompt=False) == "<|im_start|>user\nab<|im_end|>\n"
    empty = [{"role": "assistant", "content": None}]
    assert (
        template.render(empty, add_generation_prompt=False) == "<|im_start|>assistant\n<|im_end|>\n"
    )
    for bad in ("hi", [{"content": "no role"}], [{"role": "user", "content": 3}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]):  # fmt: skip
        with pytest.raises(ChatTemplateError):
            template.render(bad)


def test_generation_tag_renders_its_body(smollm2):
    """transformers' {% generation %} marker (assistant masks) is accepted and transparent."""
    _, tok = smollm2
    source = (
        "{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
    )
    assert ChatTemplate(source, tok).render(USER) == "[Hi]"


# --- runaway templates (issue 11, item 5): refused while they run, not after -----------------

RUNAWAY_TEMPLATES = [
    # time: nested loops that output nothing, so no size limit can catch them
    "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    "{% for m in messages * 1000 %}{% for n in messages * 1000 %}{% for k in messages * 1000 %}{% endfor %}{% endfor %}{% endfor %}",
    # range itself
    "{% for i in range(100000) %}{% endfor %}",
    # string-growing filters and operators
    "{{ 'x' | center(100000000) }}",
    "{{ '%100000000s' | format('x') }}",
    "{{ '%*s' | format(100000000, 'x') }}",
    "{{ '%100000000s' % 'x' }}",
    "{{ '{:>100000000}'.format('x') }}",
    "{{ 'ab\ncd' | indent(100000000) }}",
    "{{ messages | tojson(indent=100000000) }}",
    "{{ ('x' * 1000000) | replace('', 'yyyyyyyyyyyy') }}",
    "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
    "{% macro grow(s, n) %}{% if n %}{{ grow(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ grow('xxxxxxxx', 40) }}",
]


@pytest.mark.parametrize("source", RUNAWAY_TEMPLATES)
def test_runaway_templates_are_stopped(smollm2, source, monkeypatch):
    monkeypatch.setattr(chat, "RENDER_SECONDS", 0.5)  # the limit's value is not the point here
    _, tok = smollm2
    template = ChatTemplate(source, tok, name="runaway")
    with pytest.raises(ChatTemplateError, match="runaway"):
        template.render(USER)


def test_render_time_limit_stops_the_render_thread(smollm2):
    """Past the limit the caller is answered at once and the render itself is stopped (its
    thread ends), so a runaway does not keep burning a core."""
    import threading
    import time

    _, tok = smollm2
    template = ChatTemplate(RUNAWAY_TEMPLATES[0], tok, name="runaway")
    with pytest.raises(ChatTemplateError, match="ran for more than"):
        template.render(USER)
    for _ in range(100):
        if not any(t.name == "qpack-template" for t in threading.enumerate()):
            break
        time.sleep(0.05)
    assert not any(t.name == "qpack-template" for t in threading.enumerate())


def test_model_template_is_rendered_at_load(smollm2):
    _, tok = smollm2
    with pytest.raises(
        ChatTemplateError, match=r"tokenizer.chat_template.*ZeroDivisionError.*at load"
    ):
        ChatTemplate.from_metadata({"tokenizer.chat_template": "{{ 1 / 0 }}"}, tok)
    with pytest.raises(ChatTemplateError, match="tokenizer.chat_template.*unsafe"):
        ChatTemplate.from_metadata({"tokenizer.chat_template": "{{ ''.__class__ }}"}, tok)
    # A template that wants a system turn first still loads (and refuses later, per request).
    picky = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}ok"
    )
    assert (
        ChatTemplate.from_metadata({"tokenizer.chat_template": picky}, tok).render(
            [{"role": "system", "content": "s"}, *USER]
        )
        == "ok"
    )
    with pytest.raises(ChatTemplateError, match="every sample conversation"):
        ChatTemplate.from_metadata({"tokenizer.chat_template": "{{ raise_exception('no') }}"}, tok)
