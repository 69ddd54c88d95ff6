"""Random unfamiliar conversations that the demo model answers with FALLBACK_REPLY."""

import random
import string
from typing import Any

from mlx_tui.engine.demo.conversations import CONVERSATIONS, FALLBACK_REPLY, TOOLS, assistant, chat, user

WORDS = """
the a an and or but if then else of to in on at for with from by as is are was be been not no yes
you your we our they it this that these those what which who when where why how can could should
would will must may might do does did have has had get set make use run read write edit open close
file files folder path line lines code test tests build error errors output input value values name
names list item items user users agent task tasks tool tools command commands shell bash git commit
branch change changes review search find query result results request response server client model
models token tokens prompt context memory cache session time weather city today current local help
please always never only first next last new old small large fast slow good bad important note
system message messages content text json type object string number boolean array required default
description properties parameter parameters function call return true false null example examples
project directory repository environment platform version update install config settings option
Paris Tokyo London Berlin Rome Madrid Sydney York Ada prime number capital France morning name
""".split()

QUESTIONS = [m["content"] for c in CONVERSATIONS for m in c["messages"] if m["role"] == "user"]

SYMBOLS = string.ascii_letters + string.digits + string.punctuation + " "


def phrase(rng: random.Random, count: int) -> str:
    """Some random words, sometimes capitalized or punctuated."""
    words = [rng.choice(WORDS) for _ in range(count)]
    if rng.random() < 0.5:
        words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", ".", "?", "!", ":", ""])


def noise(rng: random.Random, count: int) -> str:
    """Random printable characters."""
    return "".join(rng.choice(SYMBOLS) for _ in range(count))


def block(rng: random.Random) -> str:
    """One paragraph-like piece of text: prose, a list, a heading, code or noise."""
    kind = rng.random()
    if kind < 0.45:
        return " ".join(phrase(rng, rng.randint(3, 16)) for _ in range(rng.randint(1, 5)))
    if kind < 0.6:
        return "\n".join("- " + phrase(rng, rng.randint(2, 12)) for _ in range(rng.randint(2, 6)))
    if kind < 0.7:
        return "#" * rng.randint(1, 3) + " " + phrase(rng, rng.randint(1, 4))
    if kind < 0.8:
        tag = rng.choice(WORDS)
        return f"<{tag}>\n{phrase(rng, rng.randint(5, 30))}\n</{tag}>"
    if kind < 0.9:
        lines = (f"{rng.choice(WORDS)}({rng.choice(WORDS)}, {rng.randint(0, 999)})" for _ in range(rng.randint(1, 4)))
        return "```\n" + "\n".join(lines) + "\n```"
    return noise(rng, rng.randint(5, 80))


def text(rng: random.Random, length: int) -> str:
    """Random text of about `length` characters (at least one block)."""
    blocks = [block(rng)]
    while sum(map(len, blocks)) < length:
        blocks.append(block(rng))
    return "\n\n".join(blocks)


def tool(rng: random.Random, description_length: int) -> dict[str, Any]:
    """A random function tool in OpenAI format."""
    names = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
    name = rng.choice(["_".join(names), "".join(n.capitalize() for n in names)])
    types = ["string", "number", "boolean", "array"]
    properties = {
        rng.choice(WORDS): {"type": rng.choice(types), "description": phrase(rng, rng.randint(2, 10))}
        for _ in range(rng.randint(0, 5))
    }
    required = list(properties)[: rng.randint(0, len(properties))]
    parameters = {"type": "object", "properties": properties, "required": required}
    description = text(rng, description_length)
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def mutated_question(rng: random.Random) -> str:
    """A known user question with one word replaced by a lowercase word: a near miss."""
    words = rng.choice(QUESTIONS).split()
    index = rng.randrange(len(words))
    words[index] = rng.choice([w for w in WORDS if w.islower() and w != words[index]])
    return " ".join(words)


def question(rng: random.Random, length: int) -> str:
    """An unfamiliar user message: long text, a few words, a few characters or a near miss."""
    kind = rng.random()
    if kind < 0.25:
        return phrase(rng, rng.randint(1, 4))
    if kind < 0.35:
        return noise(rng, rng.randint(1, 20))
    if kind < 0.5:
        return mutated_question(rng)
    return text(rng, length)


def unfamiliar_conversation(rng: random.Random, length: int) -> dict[str, Any]:
    """A conversation with up to about `length` characters of unfamiliar prompt, answered with FALLBACK_REPLY."""
    shares = [rng.random() for _ in range(3)]
    system_length, tools_length, user_length = (int(length * s / sum(shares)) for s in shares)
    tools = None
    if rng.random() < 0.4:
        tools = TOOLS
    elif rng.random() < 0.5:
        tools = [tool(rng, tools_length // 4) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.3:
            tools += TOOLS
        rng.shuffle(tools)
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": text(rng, system_length)})
    if rng.random() < 0.2:
        known = rng.choice(CONVERSATIONS)
        if not known["tools"] and known["messages"][0]["role"] != "system":
            messages += known["messages"]
    messages += [user(question(rng, user_length)), assistant(FALLBACK_REPLY)]
    return chat("unfamiliar", *messages, tools=tools, enable_thinking=rng.random() < 0.7)


def unfamiliar_conversations(seed: int, count: int, min_length: int, max_length: int) -> list[dict[str, Any]]:
    """`count` random unfamiliar conversations of `min_length` to `max_length` prompt characters."""
    rng = random.Random(seed)
    return [unfamiliar_conversation(rng, rng.randint(min_length, max_length)) for _ in range(count)]
