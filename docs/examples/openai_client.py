"""The unmodified ``openai`` SDK against tokenbridge (docs/openai.md); the test suite runs it.

    TOKENBRIDGE_URL=http://127.0.0.1:8000 TOKENBRIDGE_API_KEY=tbk_... python openai_client.py
"""

from __future__ import annotations

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("TOKENBRIDGE_URL", "http://127.0.0.1:8000") + "/v1",
    api_key=os.environ.get("TOKENBRIDGE_API_KEY", "unused-with-auth-disabled"),
)

# A whole answer, then a streamed one with its usage; `rate` is the demo model's tokens/s.
reply = client.chat.completions.create(
    model="demo", messages=[{"role": "user", "content": "hello"}], extra_body={"rate": 0}
)
print("whole:", reply.choices[0].message.content)

stream = client.chat.completions.create(
    model="demo",
    messages=[{"role": "user", "content": "hello again"}],
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"rate": 200},
)
streamed = ""
for chunk in stream:
    if chunk.choices:
        streamed += chunk.choices[0].delta.content or ""
    elif chunk.usage:
        print("streamed:", streamed, f"({chunk.usage.completion_tokens} tokens)")

# A background response: read a few events, drop the stream, pick up after the last one.
response = client.responses.create(
    model="demo", input="tell me more", background=True, extra_body={"rate": 200}
)
first = client.responses.retrieve(response.id, stream=True)
seen = []
for event in first:
    seen.append(event)
    if event.sequence_number == 5:
        break
first.close()
rest = client.responses.retrieve(response.id, stream=True, starting_after=5)
text = "".join(e.delta for e in [*seen, *rest] if e.type == "response.output_text.delta")
final = client.responses.retrieve(response.id)
assert text == final.output_text, "resumed text differs from the stored response"
print("background:", final.status, text)
