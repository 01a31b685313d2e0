"""Rotary position embeddings (RoPE), in the rotate-half layout that Hugging Face checkpoints use.

Pure functions: the frequencies depend only on the config, the angles only on the positions.
Everything here is computed in float32 whatever the model's dtype: in bfloat16 an angle of
position * frequency loses whole radians at long positions.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import LlamaConfig, RopeScaling


def default_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """theta ** (-2i / head_dim) for i in 0 .. head_dim/2 - 1: one frequency per pair of dimensions."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def llama3_scale_frequencies(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    """Llama 3's frequency scaling, which stretches the context from 8K to 128K positions.

    Wavelengths shorter than ``original_max / high_freq_factor`` (high frequencies) stay as they are,
    those longer than ``original_max / low_freq_factor`` are divided by ``factor``, and the band in
    between is interpolated smoothly between the two.
    """
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelength = scaling.original_max_position_embeddings / scaling.high_freq_factor
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """The model's RoPE frequencies, shape [head_dim // 2], float32."""
    inv_freq = default_inverse_frequencies(config.head_dim, config.rope_theta)
    if config.rope_scaling is not None:
        inv_freq = llama3_scale_frequencies(inv_freq, config.rope_scaling)
    return inv_freq


def rope_angles(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of position * frequency: positions [B, T] (int) -> two [B, T, head_dim // 2] float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate each pair (x[i], x[i + head_dim/2]) by its angle: x [B, T, heads, head_dim].

    This is transformers' ``x * cos + rotate_half(x) * sin`` with the duplicated cos/sin halves
    folded away.
    """
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
