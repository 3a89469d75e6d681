"""PaliGemma: a prefix-LM. Images and prompt (the prefix) attend to each other both ways;
the answer (the suffix) is causal.

PaliGemma ships no chat template; unless the folder has one, a conversation is laid out by
:data:`CHAT_TEMPLATE` as images, prompt, answer + ``<eos>``, and the processor adds ``<bos>``
after the images and a newline after the prompt: 2 text tokens the plan takes from the
processor. Its processor takes no sample without an image: such samples are dropped and
counted (``no_image``). ``token_type_ids`` are 0 on the prefix (everything before the first supervised
token) and 1 from there on, as the processor's own ``suffix=`` path makes them. transformers'
mask for packed rows (prefix blocks AND same sample) is exact with them: 2e-7; without them
samples leak into each other (0.12).
"""

from .base import Family

CHAT_TEMPLATE = (
    "{% for message in messages %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif message['role'] == 'assistant' %}{{ c['text'] }}<eos>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}")


class PaliGemma(Family):
    name = "paligemma"
    model_types = ("paligemma",)
    processor_names = ("PaliGemmaProcessor",)
    token_key = "token_type_ids"
    chat_template = CHAT_TEMPLATE
    needs_image = True

    def token_row(self, processor, ids, supervised):
        first = next((i for i, s in enumerate(supervised) if s), len(ids))
        return [0] * first + [1] * (len(ids) - first)
