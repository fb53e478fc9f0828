"""Pick an environment by name: `make_env("alfworld" | "webshop" | "search", **kwargs)`.

docs/method.md §12. The one module that knows every environment, so that the shared contract
(`envs.py`) imports none of them and the environments import only the contract.
"""
from __future__ import annotations

from alfworld_env import AlfWorldEnv
from searchqa import SearchQAEnv
from webshop import OfficialWebShopEnv, WebShopEnv

ENV_NAMES = ("alfworld", "webshop", "search")


def make_env(name: str, **kwargs):
    """One environment copy by name: "alfworld", "webshop" (`backend` "sim" or "official") or
    "search"; the other keywords go to the environment's constructor."""
    if name == "alfworld":
        return AlfWorldEnv(**kwargs)
    if name == "webshop":
        backend = kwargs.pop("backend", "sim")
        if backend not in ("sim", "official"):
            raise ValueError(f"unknown WebShop backend {backend!r}; expected 'sim' or 'official'")
        return (OfficialWebShopEnv if backend == "official" else WebShopEnv)(**kwargs)
    if name == "search":
        return SearchQAEnv(**kwargs)
    raise ValueError(f"unknown environment {name!r}; expected one of {ENV_NAMES}")
