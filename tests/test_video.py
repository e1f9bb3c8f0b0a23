"""Video encode/decode for LeRobot-style datasets: frame selection, tolerance, caching, atomic writes."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch

from vlablocks.data import video, video_writer
from vlablocks.data.video import FrameToleranceError, VideoNotFoundError, decode_frames, open_reader, video_info
from vlablocks.data.video_writer import VideoEncodeError, VideoWriter, encode_video

FPS = 30
T, H, W = 20, 48, 64
TOL = 1 / FPS - 1e-4
SLOTS = (H // 16) * (W // 8)  # 24 block positions: frame k lights slot k % 24
CODECS = [c for c in ("libsvtav1", "h264", "hevc") if video_writer.resolve_encoder(c) in video_writer.available_encoders()]
BACKENDS = ["pyav"] + (["torchcodec"] if video.torchcodec_available() else [])


def make_clip(n: int = T, first: int = 0) -> np.ndarray:
    """Frames [n, H, W, 3], smooth background plus a bright 8x8 block at slot (first + i) % SLOTS."""
    y, x = np.mgrid[:H, :W]
    frames = np.empty((n, H, W, 3), np.uint8)
    for i in range(n):
        k = first + i
        frames[i, ..., 0], frames[i, ..., 1], frames[i, ..., 2] = x * 2, y * 2, 60 + 4 * (k % SLOTS)
        row, col = divmod(k % SLOTS, W // 8)
        frames[i, row * 16 + 4:row * 16 + 12, col * 8:col * 8 + 8] = 255
    return frames


def slot_of(frames: torch.Tensor) -> list[int]:
    """The lit slot of each decoded frame [N, 3, H, W]."""
    blocks = frames[:, 0, :, :].float().reshape(len(frames), H // 16, 16, W // 8, 8)[:, :, 4:12]
    return blocks.mean(dim=(2, 4)).flatten(1).argmax(dim=1).tolist()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("clips")
    return {codec: encode_video(make_clip(), root / f"{codec}.mp4", FPS, codec=codec, crf=20) for codec in CODECS}


@pytest.fixture(autouse=True)
def fresh_cache():
    video.clear_reader_cache()
    yield
    video.clear_reader_cache()


def test_wheel_has_lerobot_encoders():
    assert {"libsvtav1", "libx264", "libx265"} <= set(video_writer.available_encoders())
    assert video_writer.resolve_encoder("libsvtav1") == "libsvtav1"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("codec", CODECS)
def test_roundtrip_close_to_source(clips, codec, backend):
    decoded = decode_frames(clips[codec], np.arange(T) / FPS, TOL, backend=backend)
    assert decoded.dtype == torch.uint8 and decoded.shape == (T, 3, H, W)
    source = torch.from_numpy(make_clip()).permute(0, 3, 1, 2)
    assert (decoded.float() - source.float()).abs().mean() < 3
    assert slot_of(decoded) == list(range(T))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("codec", CODECS)
def test_picks_nearest_frame_in_any_order(clips, codec, backend):
    rng = np.random.default_rng(0)
    wanted = rng.permutation(np.r_[np.arange(T), [3, 3, 17]])  # shuffled, with repeats
    jitter = rng.uniform(-0.45, 0.45, size=len(wanted)) / FPS
    times = np.clip(wanted / FPS + jitter, 0, (T - 1) / FPS)
    assert slot_of(decode_frames(clips[codec], times, TOL, backend=backend)) == wanted.tolist()
    for k in wanted[:8]:  # single-frame random access, as a shuffled DataLoader reads
        assert slot_of(decode_frames(clips[codec], [k / FPS], TOL, backend=backend)) == [k]


@pytest.mark.parametrize("codec", CODECS)
def test_video_info_has_lerobot_fields(clips, codec):
    info = video_info(clips[codec])
    assert info == {"video.height": H, "video.width": W, "video.codec": {"libsvtav1": "av1"}.get(codec, codec),
                    "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": float(FPS),
                    "video.channels": 3, "video.frames": T, "has_audio": False}


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_episode_file_uses_absolute_timestamps(tmp_path, backend):
    lengths = [9, 13]  # episode 1 starts at 9 / FPS in the file
    path = encode_video(np.concatenate([make_clip(9, 0), make_clip(13, 9)]), tmp_path / "file.mp4", FPS, crf=20)
    start = lengths[0] / FPS
    local = np.array([0, 5, 12])
    decoded = decode_frames(path, start + local / FPS, TOL, backend=backend)
    assert slot_of(decoded) == (lengths[0] + local).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tolerance_error_names_file_requested_and_nearest(clips, backend):
    path = clips[CODECS[0]]
    with pytest.raises(FrameToleranceError) as error:
        decode_frames(path, [0.1, 1.5], TOL, backend=backend)
    message = str(error.value)
    assert str(path) in message and "[1.5]" in message and f"[{round((T - 1) / FPS, 4)}]" in message
    with pytest.raises(FrameToleranceError, match="0.0167"):  # half-way between frames 0 and 1
        decode_frames(path, [0.5 / FPS], 0.01, backend=backend)


def test_missing_file_and_bad_arguments(tmp_path, clips):
    missing = tmp_path / "nope.mp4"
    for call in (lambda: decode_frames(missing, [0.0], TOL), lambda: video_info(missing)):
        with pytest.raises(VideoNotFoundError, match=f"{missing}: expected a video file") as error:
            call()
        assert isinstance(error.value, FileNotFoundError)
    with pytest.raises(ValueError, match="video backend must be one of"):
        decode_frames(clips[CODECS[0]], [0.0], TOL, backend="opencv")
    with pytest.raises(ValueError, match="expected finite timestamps"):
        decode_frames(clips[CODECS[0]], [float("nan")], TOL)
    with pytest.raises(VideoEncodeError, match="codec must be one of"):
        encode_video(make_clip(2), tmp_path / "x.mp4", FPS, codec="vp9")


def test_bad_frames_and_odd_sizes_raise(tmp_path):
    target = tmp_path / "odd.mp4"
    with pytest.raises(VideoEncodeError, match=r"yuv420p needs even height and width; got 47x64"):
        encode_video(make_clip(2)[:, :47], target, FPS)
    with pytest.raises(VideoEncodeError, match=r"uint8 \[T>0, H, W, 3\]; got float32 \[2, 48, 64, 3\]"):
        encode_video(make_clip(2).astype(np.float32), target, FPS)
    assert list(tmp_path.iterdir()) == []


def test_torch_frames_encode(tmp_path):
    path = encode_video(torch.from_numpy(make_clip(4)), tmp_path / "t.mp4", FPS, codec="h264")
    assert video_info(path)["video.frames"] == 4


def test_failed_encode_leaves_no_target_or_temp(tmp_path, monkeypatch):
    calls = []

    def failing(image):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return video_writer.av.VideoFrame.from_ndarray(image, format="rgb24")

    monkeypatch.setattr(video_writer, "_to_av_frame", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        encode_video(make_clip(6), tmp_path / "a.mp4", FPS, codec="h264")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    old = encode_video(make_clip(3), tmp_path / "b.mp4", FPS, codec="h264").read_bytes()
    monkeypatch.setattr(video_writer, "_to_av_frame", failing)
    calls.clear()
    with pytest.raises(RuntimeError):
        encode_video(make_clip(6), tmp_path / "b.mp4", FPS, codec="h264")
    assert [p.name for p in tmp_path.iterdir()] == ["b.mp4"] and (tmp_path / "b.mp4").read_bytes() == old


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_cache_reuses_per_process(tmp_path, monkeypatch, backend):
    path = encode_video(make_clip(4), tmp_path / "c.mp4", FPS, codec="h264")
    reader = open_reader(path, backend)
    decode_frames(path, [0.0, 0.1], TOL, backend=backend)
    assert open_reader(path, backend) is reader
    monkeypatch.setattr(video.os, "getpid", lambda: -1)  # as in a forked worker
    assert open_reader(path, backend) is not reader
    monkeypatch.undo()
    encode_video(make_clip(5), path, FPS, codec="h264")  # rewritten file: new reader
    assert open_reader(path, backend) is not reader


def test_reader_cache_is_bounded(tmp_path):
    paths = [encode_video(make_clip(2), tmp_path / f"{i}.mp4", FPS, codec="h264")
             for i in range(video.CACHE_SIZE + 1)]
    first = open_reader(paths[0])
    for path in paths[1:]:
        open_reader(path)
    assert len(video._CACHE._entries) == video.CACHE_SIZE
    assert open_reader(paths[0]) is not first


def _child_slots(path: str) -> list[int]:
    return slot_of(decode_frames(path, [5 / FPS, 6 / FPS], TOL))


def test_forked_worker_decodes_after_parent_opened(clips):
    path = str(clips[CODECS[0]])
    decode_frames(path, [10 / FPS], TOL)  # parent holds an open container, mid-stream
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_child_slots, (path,)) == [5, 6]
    assert slot_of(decode_frames(path, [11 / FPS], TOL)) == [11]


@pytest.mark.skipif("torchcodec" not in BACKENDS, reason="torchcodec does not load here")
@pytest.mark.parametrize("codec", CODECS)
def test_backends_agree(clips, codec):
    times = np.arange(0, T, 3) / FPS
    a = decode_frames(clips[codec], times, TOL, backend="pyav").int()
    b = decode_frames(clips[codec], times, TOL, backend="torchcodec").int()
    assert (a - b).abs().max() <= 2


def test_episodes_appended_to_one_file_keep_counting_time(tmp_path):
    """VideoWriter appends clip after clip: the second clip's frame k is at ``(9 + k) / fps``,
    ``frames_written`` says where an episode starts, and a frame of another size is refused."""
    with VideoWriter(tmp_path / "file.mp4", FPS, codec="h264", crf=20) as writer:
        writer.append(make_clip(9, 0))
        assert writer.frames_written == 9 and not (tmp_path / "file.mp4").exists()  # in place only when closed
        writer.append(torch.from_numpy(make_clip(13, 9)))
        with pytest.raises(VideoEncodeError, match=r"frames must be 48x64 like the earlier ones; got 32x64"):
            writer.append(make_clip(2)[:, :32])
    assert video_info(writer.path)["video.frames"] == 22 and writer.frames_written == 22
    decoded = decode_frames(writer.path, (9 + np.arange(13)) / FPS, TOL)
    assert slot_of(decoded) == [(9 + k) % SLOTS for k in range(13)]
    with pytest.raises(RuntimeError, match="boom"), VideoWriter(tmp_path / "aborted.mp4", FPS, codec="h264") as writer:
        writer.append(make_clip(3))
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.mp4"]
