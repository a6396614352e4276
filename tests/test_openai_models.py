"""GET /v1/models and /v1/models/{model} through the unmodified ``openai`` SDK: OpenAI's shape."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai.types import Model

from tests.servers import Gateway


async def test_the_sdk_lists_and_retrieves_models_in_openais_shape(settings_factory: Any) -> None:
    settings = settings_factory(models={"demo": "demo", "team/demo-2": "demo"})
    async with (
        Gateway(settings, worker=False) as gw,
        openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client,
    ):
        listed = [model async for model in client.models.list()]
        assert [m.id for m in listed] == ["demo", "team/demo-2"]
        for model in listed:
            Model.model_validate(model.model_dump())  # every field the spec requires
            assert model.object == "model" and model.owned_by == "tokenbridge"
            assert model.created > 1_700_000_000  # Unix seconds, not milliseconds nor 0
            assert model.model_extra == {"adapter": "demo"}
        one = await client.models.retrieve("team/demo-2")  # a name with a slash
        assert one.model_dump() == listed[1].model_dump()
        with pytest.raises(openai.NotFoundError, match="unknown model"):
            await client.models.retrieve("gpt-nope")
