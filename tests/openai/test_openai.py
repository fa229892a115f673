"""The official `openai` Python client against `attune serve`.

Run by scripts/test-openai.sh, which starts the server on a library holding the
default model, the reference PEFT LoRA adapter (`pubmed-lora`) and a prompt
template (`Brief`), and passes:
  ATTUNE_BASE_URL   http://127.0.0.1:PORT/v1
  ATTUNE_API_KEY    the server's key
  ATTUNE_MODEL      the default model's library name
  ATTUNE_GREEDY     the text `attune generate --chat` gave greedily for PROMPT
"""
import os
import sys

import openai

BASE = os.environ["ATTUNE_BASE_URL"]
KEY = os.environ["ATTUNE_API_KEY"]
MODEL = os.environ["ATTUNE_MODEL"]
GREEDY = os.environ["ATTUNE_GREEDY"]
PROMPT = "What is the capital of France?"

client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=300)
failures = []


def check(name, cond, detail=""):
    print(("ok   " if cond else "FAIL ") + name + ("" if cond else f": {detail}"))
    if not cond:
        failures.append(name)


# The library as models.
ids = [m.id for m in client.models.list().data]
check("models list the base model", MODEL in ids, ids)
check("models list the adapter", "pubmed-lora" in ids, ids)
check("models list the template", "Brief" in ids, ids)
check("models carry owned_by and created",
      all(m.owned_by and m.created > 0 for m in client.models.list().data))

# Chat without streaming: greedy equals `attune generate --chat`.
r = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": PROMPT}],
    temperature=0, max_tokens=24, seed=1)
check("chat answers", r.choices[0].message.content is not None)
check("chat greedy equals attune generate", r.choices[0].message.content == GREEDY,
      (r.choices[0].message.content, GREEDY))
check("chat usage", r.usage.completion_tokens > 0 and
      r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage)
check("chat object", r.object == "chat.completion", r.object)

# Chat with streaming, and the usage chunk.
stream = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": PROMPT}],
    temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True})
text, usage, finish = "", None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            text += c.delta.content
        if c.finish_reason:
            finish = c.finish_reason
check("streamed text equals the greedy answer", text == GREEDY, (text, GREEDY))
check("stream ends with a finish reason", finish in ("stop", "length"), finish)
check("stream sends usage last", usage is not None and usage.completion_tokens > 0, usage)

# An adapter and a template as the model.
r = client.chat.completions.create(
    model="pubmed-lora", messages=[{"role": "user", "content": PROMPT}],
    temperature=0, max_tokens=12)
check("adapter answers", bool(r.choices[0].message.content), r)
by_hand = client.chat.completions.create(
    model=MODEL, messages=[{"role": "system", "content": "Answer in one short sentence."},
                           {"role": "user", "content": "Question: " + PROMPT}],
    temperature=0, max_tokens=12)
r = client.chat.completions.create(
    model="Brief", messages=[{"role": "user", "content": PROMPT}],
    temperature=0, max_tokens=12)
check("template applies its system prompt and wrapper",
      r.usage.prompt_tokens == by_hand.usage.prompt_tokens
      and r.choices[0].message.content == by_hand.choices[0].message.content,
      (r.usage, by_hand.usage, r.choices[0].message.content, by_hand.choices[0].message.content))

# Stop sequences.
r = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
    temperature=0, max_tokens=40, stop=["5"])
content = r.choices[0].message.content
check("stop sequence ends the answer before it", "5" not in content and r.choices[0].finish_reason == "stop",
      (content, r.choices[0].finish_reason))

# Legacy completions.
r = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=8)
check("completions answer", r.object == "text_completion" and r.usage.completion_tokens <= 8, r)

# Errors.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    check("unknown model is 404", False, "no error")
except openai.NotFoundError as e:
    check("unknown model is 404", e.status_code == 404 and e.body.get("code") == "model_not_found", e.body)
try:
    openai.OpenAI(base_url=BASE, api_key="wrong", max_retries=0).models.list()
    check("wrong key is 401", False, "no error")
except openai.AuthenticationError as e:
    check("wrong key is 401", e.status_code == 401 and "wrong" not in str(e.body), e.body)
try:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    check("n=2 is 400", False, "no error")
except openai.BadRequestError as e:
    check("n=2 is 400 naming the field", e.status_code == 400 and e.body.get("param") == "n", e.body)

if failures:
    print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
    sys.exit(1)
print("all checks passed")
