"""Batch keys of the policy contract (shared by data, training, evaluation and the policy).

| key | shape | notes |
| --- | --- | --- |
| ``images`` | ``[B, N, 3, H, W]`` float in [0, 1] | N cameras |
| ``image_mask`` | ``[B, N]`` bool | optional; False for a missing camera |
| ``depth`` | ``[B, N, H, W]`` | optional geometry: z-depth (with ``intrinsics``) |
| ``intrinsics`` | ``[B, N, 3, 3]`` | pinhole K |
| ``cam_to_world`` | ``[B, N, 4, 4]`` | optional camera pose (OpenCV convention) |
| ``points`` | ``[B, N, H, W, 3]`` | optional geometry: a point map (MapAnything ``pts3d``) |
| ``ray_directions``, ``depth_along_ray`` | ``[B, N, H, W, 3]``, ``[B, N, H, W]`` | optional geometry: MapAnything rays |
| ``task`` | ``list[str]`` of length B | the language instruction |
| ``state`` | ``[B, S]`` | proprioception, raw units |
| ``actions`` | ``[B, H, A]`` | action chunk, raw units (training) |
| ``action_mask`` | ``[B, H]`` bool | optional; False past the episode end |
"""

IMAGES = "images"
IMAGE_MASK = "image_mask"
DEPTH = "depth"
INTRINSICS = "intrinsics"
CAM_TO_WORLD = "cam_to_world"
POINTS = "points"
RAY_DIRECTIONS = "ray_directions"
DEPTH_ALONG_RAY = "depth_along_ray"
TASK = "task"
STATE = "state"
ACTIONS = "actions"
ACTION_MASK = "action_mask"

#: the per-camera geometry inputs, in the keyword names of ``GeometryEncoder.forward``.
GEOMETRY_KEYS = (DEPTH, INTRINSICS, CAM_TO_WORLD, POINTS, RAY_DIRECTIONS, DEPTH_ALONG_RAY)
