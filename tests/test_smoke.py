import base64
import io

from PIL import Image

from .conftest import base_config


async def test_placeholder_b64(start_proxy, tmp_path):
    _, client = await start_proxy(base_config(tmp_path))
    r = await client.images.generate(model="qwen-image-placeholder", prompt="a cat", size="16:9",
                                     response_format="b64_json")
    im = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert (im.format, im.size) == ("PNG", (1365, 768))
