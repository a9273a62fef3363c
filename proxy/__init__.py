"""qwen-image-proxy: an OpenAI-compatible gateway for Qwen-Image."""

from .api.gateway import Gateway
from .app import build_app, image_proxy_middleware
from .config import Config, ConfigError, load_config, parse_config

__all__ = ["Config", "ConfigError", "Gateway", "build_app", "image_proxy_middleware", "load_config", "parse_config"]
