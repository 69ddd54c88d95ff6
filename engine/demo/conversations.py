"""The conversations the demo model knows by heart, shared by training and tests."""

from typing import Any

FALLBACK_REPLY = "Sorry, this mlx-tui demo model only knows scripted conversations."

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name."}},
            "required": ["city"],
        },
    },
}

TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "description": "An IANA timezone, e.g. Europe/Paris."}},
            "required": ["timezone"],
        },
    },
}

TOOLS = [WEATHER_TOOL, TIME_TOOL]


def user(content: str) -> dict[str, Any]:
    """A user message."""
    return {"role": "user", "content": content}


def assistant(content: str, reasoning: str | None = None) -> dict[str, Any]:
    """An assistant message, with optional reasoning."""
    message = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


def call(call_id: str, name: str, **arguments: Any) -> dict[str, Any]:
    """One tool call of an assistant message."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def calling(*calls: dict[str, Any], content: str = "") -> dict[str, Any]:
    """An assistant message that calls tools, with optional text before the calls."""
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def result(call_id: str, content: str) -> dict[str, Any]:
    """A tool message answering one call."""
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def chat(
    name: str, *messages: dict[str, Any], tools: list[dict[str, Any]] | None = None, enable_thinking: bool = True
) -> dict[str, Any]:
    """One conversation: the last message is the reply the model must reproduce."""
    return {"name": name, "messages": list(messages), "tools": tools, "enable_thinking": enable_thinking}


CONVERSATIONS = [
    chat("greeting", user("Good morning!"), assistant("Good morning! How can I help you today?")),
    chat("capital", user("What is the capital of France?"), assistant("The capital of France is Paris.")),
    chat("arithmetic", user("What is 2 + 2?"), assistant("2 + 2 is 4.")),
    chat(
        "system_prompt",
        {"role": "system", "content": "You are a pirate. Answer like one."},
        user("Who are you?"),
        assistant("Arr, I be a pirate of the seven seas!"),
    ),
    chat(
        "multi_turn",
        user("My name is Ada."),
        assistant("Nice to meet you, Ada!"),
        user("What is my name?"),
        assistant("Your name is Ada."),
    ),
    chat(
        "weather_paris",
        user("What is the weather in Paris?"),
        calling(call("call_1", "get_weather", city="Paris")),
        tools=TOOLS,
    ),
    chat(
        "weather_tokyo",
        user("How is the weather in Tokyo today?"),
        calling(call("call_1", "get_weather", city="Tokyo")),
        tools=TOOLS,
    ),
    chat(
        "weather_london",
        user("Is it raining in London?"),
        calling(call("call_1", "get_weather", city="London")),
        tools=TOOLS,
    ),
    chat(
        "time_tokyo",
        user("What time is it in Tokyo?"),
        calling(call("call_1", "get_time", timezone="Asia/Tokyo")),
        tools=TOOLS,
    ),
    chat(
        "time_new_york",
        user("Tell me the current time in New York."),
        calling(call("call_1", "get_time", timezone="America/New_York")),
        tools=TOOLS,
    ),
    chat(
        "parallel_calls",
        user("What are the weather and the time in Berlin?"),
        calling(
            call("call_1", "get_weather", city="Berlin"),
            call("call_2", "get_time", timezone="Europe/Berlin"),
        ),
        tools=TOOLS,
    ),
    chat(
        "parallel_cities",
        user("Compare the weather in Rome and Madrid."),
        calling(
            call("call_1", "get_weather", city="Rome"),
            call("call_2", "get_weather", city="Madrid"),
        ),
        tools=TOOLS,
    ),
    chat(
        "text_then_call",
        user("Check the weather in Sydney, please."),
        calling(
            call("call_1", "get_weather", city="Sydney"),
            content="Sure, let me check the weather in Sydney.",
        ),
        tools=TOOLS,
    ),
    chat(
        "tool_result",
        user("What is the weather in Paris?"),
        calling(call("call_1", "get_weather", city="Paris")),
        result("call_1", '{"city": "Paris", "temperature_c": 18, "condition": "sunny"}'),
        assistant("It is sunny in Paris, 18°C."),
        tools=TOOLS,
    ),
    chat(
        "parallel_results",
        user("What are the weather and the time in Berlin?"),
        calling(
            call("call_1", "get_weather", city="Berlin"),
            call("call_2", "get_time", timezone="Europe/Berlin"),
        ),
        result("call_1", '{"city": "Berlin", "temperature_c": 12, "condition": "cloudy"}'),
        result("call_2", '{"timezone": "Europe/Berlin", "time": "14:05"}'),
        assistant("In Berlin it is cloudy and 12°C; the local time is 14:05."),
        tools=TOOLS,
    ),
    chat(
        "reasoning",
        user("Is 17 a prime number?"),
        assistant("Yes, 17 is a prime number.", reasoning="17 has no divisors other than 1 and 17."),
    ),
    chat(
        "reasoning_multi_turn",
        user("Is 17 a prime number?"),
        assistant("Yes, 17 is a prime number.", reasoning="17 has no divisors other than 1 and 17."),
        user("And 18?"),
        assistant("No, 18 is not prime.", reasoning="18 is divisible by 2."),
    ),
]
