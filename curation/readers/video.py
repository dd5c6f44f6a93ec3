"""AVI / MP4 / MOV / MKV videos (PyAV): frames are z."""

from __future__ import annotations

from typing import Any

import numpy as np

from curation.readers.base import Volume, luma

VIDEO_EXTS = (".avi", ".mp4", ".mov", ".mkv")


class VideoVolume(Volume):
    """AVI / MP4 / MOV / MKV via PyAV: frames are z, converted to grey (RGB pixel formats with the
    exact 601 luma). Frames are counted by demuxing packets, since headers often omit or misstate
    the count; reads decode forward from the last position and restart only to go back."""

    reader = "video"
    _container: Any = None

    def _open(self) -> None:
        import av

        with av.open(self.path) as container:
            if not container.streams.video:
                raise self._fail("has no video stream")
            stream = container.streams.video[0]
            pix = stream.codec_context.pix_fmt or ""
            n = sum(1 for packet in container.demux(stream) if packet.size)
        if n == 0:
            raise self._fail("empty volume: the video has no frames")
        self._format = ("gray16le" if pix.startswith("gray") and pix not in ("gray", "gray8") else
                        "rgb24" if pix.startswith(("rgb", "bgr", "argb", "abgr", "gbr")) else "gray")
        self._restart()
        first = self._frame(0)
        self.shape, self.chunk_zyx = (n, *first.shape), (1, *first.shape)  # type: ignore[assignment]
        self.dtype, self.is_volume = first.dtype, True
        self._set_voxel_size(None)

    def _restart(self) -> None:
        import av

        self.close()
        self._container = av.open(self.path)
        self._closers.append(self._container)
        self._decoder = self._container.decode(self._container.streams.video[0])
        self._next, self._last = 0, None

    def _frame(self, i: int) -> np.ndarray:
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        if i < self._next:
            self._restart()
        while self._next <= i:
            frame = next(self._decoder, None)
            if frame is None:
                raise self._fail(f"video ended after {self._next} decodable frames; frame {i} was asked for")
            self._next += 1
        grey = frame.to_ndarray(format=self._format)
        grey = luma(grey) if self._format == "rgb24" else grey
        self._last = (i, grey)
        return grey

    def _read(self, z: slice, y: slice, x: slice) -> np.ndarray:
        return np.stack([self._frame(i)[y, x] for i in range(z.start, z.stop, z.step)])
