"""Fast offscreen rendering of one MuJoCo camera: RGB and metric z-depth from one render pass.

The GL backend comes from ``MUJOCO_GL`` when a context is made (``egl`` when unset; ``osmesa``
also works), even when MuJoCo was imported first; this module leaves ``os.environ`` alone.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
# Mesa's software GL (llvmpipe, behind EGL/OSMesa) and triton (loaded by torch's compiler stack,
# e.g. when diffusers is imported) each bring their own LLVM: importing triton after a GL context
# exists segfaults the process. Load it before any context is made.
import torch._dynamo  # noqa: F401

from vlablocks.envs.metaworld import INSTALL_HINT

try:
    import mujoco
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(INSTALL_HINT) from error

MAX_DEPTH_M = 10.0  # farther pixels are the skybox (rendered at ~70-110 m): reported as 0 (no depth)
DEFAULT_GL = "egl"  # the backend when MUJOCO_GL is unset


def gl_backend() -> str:
    """The offscreen GL backend to use now: ``MUJOCO_GL`` (lower case), :data:`DEFAULT_GL` when unset."""
    return (os.environ.get("MUJOCO_GL") or DEFAULT_GL).lower()


def gl_context_class(backend: str) -> type:
    """The GL context class of ``backend`` (``egl``, ``osmesa`` or anything else: MuJoCo's default).

    Picked at call time: MuJoCo picks its default ``mujoco.GLContext`` once, when first imported.
    """
    if backend == "egl":
        from mujoco.egl import GLContext
    elif backend == "osmesa":
        from mujoco.osmesa import GLContext
    else:
        GLContext = mujoco.GLContext
    return GLContext


class OffscreenCamera:
    """One camera of a MuJoCo model rendered offscreen at ``size x size`` px.

    Fast settings: no shadows, no reflections, no multisampling (``offsamples = 0`` is written
    into ``model`` before the GL context is made). Images are upright; the ``corner*`` cameras,
    which MuJoCo renders upside down, are rotated 180 degrees and their pose with them.
    Depth: the depth buffer (reversed z, 1 at the near plane, 0 at the far one) is converted to
    metric z-depth with the model's clip planes ``near = znear * extent``, ``far = zfar * extent``:
    ``z = near * far / (near + d * (far - near))``; pixels farther than :data:`MAX_DEPTH_M`
    (the skybox) become 0.
    """

    def __init__(self, model: mujoco.MjModel, camera: str, size: int, depth: bool) -> None:
        limit = min(model.vis.global_.offwidth, model.vis.global_.offheight)
        if not 1 <= size <= limit:
            raise ValueError(f"image size must be in [1, {limit}] (the model's offscreen buffer); got {size}")
        self.camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if self.camera_id < 0:
            names = [model.camera(i).name for i in range(model.ncam)]
            raise ValueError(f"camera {camera!r} is not in the model; cameras: {names}")
        self.size, self.depth = size, depth
        model.vis.quality.offsamples = 0
        model.vis.quality.shadowsize = 0
        self._model = model
        self._gl, context = self._make_context(model, size)
        self._context: mujoco.MjrContext | None = context
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, context)
        context.readDepthMap = mujoco.mjtDepthMap.mjDEPTH_ZEROFAR
        self._scene = mujoco.MjvScene(model, maxgeom=10_000)
        self._scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._camera.fixedcamid = self.camera_id
        self._option = mujoco.MjvOption()
        self._rect = mujoco.MjrRect(0, 0, size, size)
        self._rotated = camera.startswith("corner")
        self.near = float(model.vis.map.znear * model.stat.extent)
        self.far = float(model.vis.map.zfar * model.stat.extent)
        self._rgb = np.empty((size, size, 3), dtype=np.uint8)
        self._depth = np.empty((size, size), dtype=np.float32)

    @staticmethod
    def _make_context(model: mujoco.MjModel, size: int) -> tuple[Any, mujoco.MjrContext]:
        """A current GL context of :func:`gl_backend` and MuJoCo's render context on it."""
        backend = gl_backend()
        try:
            gl = gl_context_class(backend)(size, size)
            gl.make_current()
            return gl, mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_50)
        except (ImportError, mujoco.FatalError) as error:
            raise RuntimeError(
                f"no offscreen OpenGL context with MUJOCO_GL={backend!r}: use egl (the default) or osmesa "
                "(apt-get install libosmesa6)"
            ) from error

    def render(self, data: mujoco.MjData) -> tuple[np.ndarray, np.ndarray | None]:
        """-> image ``[H, W, 3]`` uint8 and, if ``depth``, z-depth ``[H, W]`` float32 metres."""
        if self._context is None:
            raise RuntimeError("render() after close()")
        self._gl.make_current()
        mujoco.mjv_updateScene(self._model, data, self._option, None, self._camera, mujoco.mjtCatBit.mjCAT_ALL, self._scene)
        mujoco.mjr_render(self._rect, self._scene, self._context)
        mujoco.mjr_readPixels(self._rgb, self._depth if self.depth else None, self._rect, self._context)
        # OpenGL rows run bottom-up: flip rows to get an upright image; the corner cameras also
        # need a 180-degree turn, which leaves only a column flip.
        view = (slice(None), slice(None, None, -1)) if self._rotated else (slice(None, None, -1),)
        image = np.ascontiguousarray(self._rgb[view])
        if not self.depth:
            return image, None
        buffer = self._depth[view].astype(np.float64)
        z = self.near * self.far / (self.near + buffer * (self.far - self.near))
        return image, np.where(z <= MAX_DEPTH_M, z, 0.0).astype(np.float32)

    def intrinsics(self) -> np.ndarray:
        """Pinhole ``K [3, 3]`` (float32) from the camera's vertical field of view; pixel centres at +0.5."""
        fovy = math.radians(float(self._model.cam_fovy[self.camera_id]))
        focal = 0.5 * self.size / math.tan(0.5 * fovy)
        centre = 0.5 * self.size
        return np.array([[focal, 0.0, centre], [0.0, focal, centre], [0.0, 0.0, 1.0]], dtype=np.float32)

    def cam_to_world(self, data: mujoco.MjData) -> np.ndarray:
        """The camera pose ``[4, 4]`` (float32), OpenCV axes (x right, y down, z forward) of the image."""
        rotation = data.cam_xmat[self.camera_id].reshape(3, 3) @ np.diag([1.0, -1.0, -1.0])  # MuJoCo looks along -z, y up
        if self._rotated:
            rotation = rotation @ np.diag([-1.0, -1.0, 1.0])
        pose = np.eye(4)
        pose[:3, :3], pose[:3, 3] = rotation, data.cam_xpos[self.camera_id]
        return pose.astype(np.float32)

    def close(self) -> None:
        """Free the GL resources (idempotent)."""
        if self._context is not None:
            self._gl.make_current()
            self._context.free()
            self._gl.free()
            self._context = None
