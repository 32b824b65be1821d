"""mp4 writing (read back: frames, size, pixels) and contact sheets."""

import av
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from mixgrpo.results.media import contact_sheet, read_mp4, to_thwc, write_mp4


def block_video_TCHW(frames=5, height=4, width=6):
    # Saturated flat colours survive H.264 almost exactly once every pixel is a 32x32 block.
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 2, (frames, 3, height, width), generator=g).float()


def test_mp4_roundtrip_frames_size_and_pixels(tmp_path):
    video = block_video_TCHW()
    path = write_mp4(tmp_path / "v.mp4", video, fps=8)
    frames = read_mp4(path)
    assert frames.shape == (5, 128, 192, 3)  # 4x6 upscaled x32 so the short side reaches 128 px
    expected = video.permute(0, 2, 3, 1).repeat_interleave(32, 1).repeat_interleave(32, 2).numpy()
    # Compare block centres: H.264 smears a few pixels at colour edges, flat interiors stay within ~2/255.
    centres = (slice(None), slice(16, None, 32), slice(16, None, 32))
    np.testing.assert_allclose(frames[centres], expected[centres], atol=0.08)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # no temporary left behind
    # A second decoder agrees, and the stream is what browsers play (H.264, yuv420p).
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert sum(1 for _ in container.decode(stream)) == 5


def test_mp4_layouts_grey_and_odd_sizes(tmp_path):
    thwc = np.random.default_rng(0).random((3, 5, 7, 1), dtype=np.float32)  # grey, odd sides
    write_mp4(tmp_path / "g.mp4", thwc, fps=4)
    # 5x7 -> x26 = 130x182 (even already); frame count survives.
    assert read_mp4(tmp_path / "g.mp4").shape == (3, 130, 182, 3)
    tchw = torch.from_numpy(thwc).permute(0, 3, 1, 2)
    np.testing.assert_array_equal(to_thwc(tchw), to_thwc(thwc))
    # Odd upscaled sides are padded to even for yuv420p: 43x129 (x3) = 129x387 -> 130x388.
    write_mp4(tmp_path / "o.mp4", np.zeros((2, 3, 43, 129), dtype=np.float32), fps=4, layout="TCHW")
    assert read_mp4(tmp_path / "o.mp4").shape == (2, 130, 388, 3)


@pytest.mark.parametrize(
    ("video", "kwargs", "match"),
    [
        (np.zeros((2, 3, 8, 3)), {}, "layout='TCHW'"),
        (np.full((2, 3, 8, 8), 255.0), {}, "divide uint8-scale videos by 255"),
        (np.full((2, 3, 8, 8), np.nan), {}, "NaN"),
        (np.zeros((3, 8, 8)), {}, "4-D"),
        (np.zeros((2, 8, 8, 8)), {"layout": "THWC"}, "1 or 3 channels"),
    ],
)
def test_bad_videos_raise(tmp_path, video, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_mp4(tmp_path / "x.mp4", video, fps=8, **kwargs)
    assert not list(tmp_path.iterdir())


def test_bad_mp4_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"end in \.mp4"):
        write_mp4(tmp_path / "x.gif", block_video_TCHW(), fps=8)
    with pytest.raises(ValueError, match="fps"):
        write_mp4(tmp_path / "x.mp4", block_video_TCHW(), fps=0)
    with pytest.raises(ValueError, match="no video file"):
        read_mp4(tmp_path / "missing.mp4")


def test_contact_sheet_rows_and_captions(tmp_path):
    video = block_video_TCHW(frames=12)
    one = iio.imread(contact_sheet([video], ["a red ball"], tmp_path / "one.png"))
    three = iio.imread(
        contact_sheet([video, read_mp4(write_mp4(tmp_path / "v.mp4", video, fps=8)), video[:2, :1]],
                      ["a", "b (from mp4)", "c grey"], tmp_path / "three.png", max_frames=4)
    )
    assert one.ndim == 3 and three.shape[0] > 2 * one.shape[0]  # one row per video
    assert one.std() > 10  # the frames were drawn, not a blank canvas
    with pytest.raises(ValueError, match="one per video"):
        contact_sheet([video], ["a", "b"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
