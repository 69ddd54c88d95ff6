"""Synthetic edit tasks: a short Python or config file, a one-line change to make, the whole edited file.

Each task is one user message (the file in a fence, then the instruction) and the reply an
agent's edit tool would want: the whole file with the change. The changes are the kind a
copy model can learn from the prompt alone: rename an identifier everywhere, change one
number, add a line after a given line, delete a line.
"""

import random
from dataclasses import dataclass

WORDS = (
    "user count size path name item value total index limit buffer config result data line file "
    "offset query token cache entry record score level state mode page text word key node edge "
    "batch chunk frame stream timer event handler parser reader writer client server request reply "
    "width height depth color label title price amount rate delta step round start stop min max"
).split()
VERBS = "load save parse read write build check update reset format count merge split find apply send".split()
SECTIONS = "server database cache logging paths network limits display build test".split()
EDITS = ("rename", "number", "add", "delete")
# plain chat questions, answered with text that is not in the prompt (the chat sub-run)
TOPICS = {
    "tea": (
        "Green tea is made from leaves that are steamed or pan-fired soon after picking, which keeps "
        "their colour and a fresh, grassy taste. Black tea is rolled and left to oxidise for hours "
        "before drying, so it brews darker and stronger. Brew green tea below boiling, for two minutes."
    ),
    "bikes": (
        "Check the tyre pressure every week, oil the chain after rain, and keep both brakes adjusted "
        "so the levers stop well before the handlebar. Once a season, look for worn brake pads, loose "
        "bolts and frayed cables, and clean the drivetrain with a brush and some degreaser."
    ),
    "bread": (
        "Mix flour, water, salt and yeast into a shaggy dough and let it rest for half an hour. Fold "
        "it a few times over the next two hours, shape a round loaf, proof it in a floured basket "
        "overnight in the fridge, then bake it in a hot covered pot for forty minutes."
    ),
    "sleep": (
        "Go to bed and get up at the same times each day, keep the bedroom dark, quiet and cool, and "
        "avoid coffee after lunch. A short walk in daylight each morning helps to set the body clock, "
        "while screens late at night tend to push it later."
    ),
}
QUESTIONS = (
    "Tell me about {}.",
    "What should I know about {}?",
    "Can you explain {} briefly?",
    "Give me some advice on {}.",
)


@dataclass(frozen=True)
class Task:
    """`edited` is the reply: the edited file, or for a chat question the topic's paragraph."""

    kind: str
    file: str
    instruction: str
    edited: str

    def messages(self) -> list[dict]:
        if self.kind == "chat":
            return [{"role": "user", "content": self.instruction}]
        return [{"role": "user", "content": f"Here is a file:\n```\n{self.file}```\n{self.instruction}"}]


def identifier(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "_".join(rng.sample(WORDS, rng.choice((1, 2, 2, 3))))
        if name not in taken:
            taken.add(name)
            return name


def python_file(rng: random.Random, lines: int) -> list[str]:
    """Functions of assignments, ifs, loops and returns over a few names and numbers."""
    taken: set[str] = set()
    out: list[str] = []
    while len(out) < lines:
        names = [identifier(rng, taken) for _ in range(rng.randint(2, 4))]
        out.append(f"def {rng.choice(VERBS)}_{identifier(rng, taken)}({', '.join(names[:2])}):")
        for _ in range(rng.randint(2, 5)):
            a, b = rng.sample(names, 2)
            shape = rng.randrange(5)
            n = rng.randint(0, 999)
            if shape == 0:
                out.append(f"    {a} = {b} + {n}")
            elif shape == 1:
                out += [f"    if {a} > {n}:", f"        {b} = {a} * {rng.randint(2, 9)}"]
            elif shape == 2:
                out += [f"    for {a} in range({n}):", f"        {b} += {a}"]
            elif shape == 3:
                out.append(f'    {a} = "{rng.choice(WORDS)} {rng.choice(WORDS)}"')
            else:
                out.append(f"    {a} = {rng.choice(VERBS)}_{b}({n})")
        out += [f"    return {rng.choice(names)}", ""]
    return out[:lines]


def config_file(rng: random.Random, lines: int) -> list[str]:
    """An INI file: sections of `key = value` lines."""
    taken: set[str] = set()
    out: list[str] = []
    for section in rng.sample(SECTIONS, len(SECTIONS)):
        out.append(f"[{section}]")
        for _ in range(rng.randint(2, 5)):
            value = rng.choice((str(rng.randint(0, 9999)), rng.choice(WORDS), "true", "false"))
            out.append(f"{identifier(rng, taken)} = {value}")
        out.append("")
        if len(out) >= lines:
            break
    return out[:lines]


def numbers(lines: list[str]) -> dict[str, int]:
    """Each number and how many times it occurs as a whole word."""
    seen: dict[str, int] = {}
    for line in lines:
        for word in line.replace("(", " ").replace(")", " ").replace(":", " ").split():
            if word.isdigit():
                seen[word] = seen.get(word, 0) + 1
    return seen


def names(lines: list[str]) -> set[str]:
    """Identifiers (with underscores, so never a keyword) in the file."""
    words = " ".join(lines)
    for c in '()=:+*,[]"':
        words = words.replace(c, " ")
    return {w for w in words.split() if "_" in w and w.replace("_", "").isalpha()}


def rename(line: str, old: str, new: str) -> str:
    """Replace `old` where it stands as a whole identifier."""
    out, i = [], 0
    while (j := line.find(old, i)) >= 0:
        end = j + len(old)
        whole = (j == 0 or not (line[j - 1].isalnum() or line[j - 1] == "_")) and (
            end == len(line) or not (line[end].isalnum() or line[end] == "_")
        )
        out.append(line[i:j] + (new if whole else old))
        i = end
    return "".join(out) + line[i:]


def edit_task(rng: random.Random, min_lines: int = 8, max_lines: int = 24, kind: str | None = None) -> Task:
    lines = (python_file if rng.random() < 0.6 else config_file)(rng, rng.randint(min_lines, max_lines))
    while lines and not lines[-1]:
        lines.pop()
    kind = kind or rng.choice(EDITS)
    unique = [n for n, c in numbers(lines).items() if c == 1]
    if kind == "number" and unique:
        old = rng.choice(unique)
        new = str(rng.randint(0, 9999))
        while new in numbers(lines):
            new = str(rng.randint(0, 9999))
        instruction = f"Change the number {old} to {new}."
        edited = [rename(line, old, new) for line in lines]
    elif kind == "rename" and names(lines):
        old = rng.choice(sorted(names(lines)))
        new = identifier(rng, names(lines))
        instruction = f"Rename {old} to {new}."
        edited = [rename(line, old, new) for line in lines]
    elif kind == "add":
        where = rng.choice([i for i, line in enumerate(lines) if line.strip() and lines.count(line) == 1])
        indent = lines[where][: len(lines[where]) - len(lines[where].lstrip())]
        if lines[where].rstrip().endswith(":") and not lines[where].startswith("["):
            indent += "    "
        taken = names(lines)
        added = indent + f"{identifier(rng, taken)} = {rng.randint(0, 999)}"
        instruction = f"Add the line `{added.strip()}` after the line `{lines[where].strip()}`."
        edited = lines[: where + 1] + [added] + lines[where + 1 :]
    else:
        kind = "delete"
        where = rng.choice([i for i, line in enumerate(lines) if line.strip() and lines.count(line) == 1])
        instruction = f"Delete the line `{lines[where].strip()}`."
        edited = lines[:where] + lines[where + 1 :]
    file, result = "\n".join(lines) + "\n", "\n".join(edited) + "\n"
    return Task(kind, file, instruction + " Reply with the whole file.", result)


REPLAY_SEED = 20_000
REPLAY_LINES = (14, 18)


def replayed_edits(n: int) -> list[Task]:
    """The edit benchmark's `n` tasks of 14-18 lines, the edit kinds in turn (the first `n` of any longer list)."""
    rng = random.Random(REPLAY_SEED)
    return [edit_task(rng, *REPLAY_LINES, kind=EDITS[i % len(EDITS)]) for i in range(n)]


def replayed_chats(n: int) -> list[Task]:
    """The edit benchmark's `n` plain questions, each answered by its topic's paragraph."""
    topics = sorted(TOPICS)
    return [
        Task("chat", "", QUESTIONS[i % len(QUESTIONS)].format(topics[i % len(topics)]), TOPICS[topics[i % len(topics)]])
        for i in range(n)
    ]


def chat_task(rng: random.Random) -> Task:
    """A plain question whose answer is a paragraph that shares no text with the prompt."""
    topic = rng.choice(sorted(TOPICS))
    return Task("chat", "", rng.choice(QUESTIONS).format(topic), TOPICS[topic])
