"""Codecs between task values and network outputs (the mmpose split): one piece makes the training targets and
decodes the predictions. Keypoints <-> heatmaps (human pose) and angles <-> bins (head pose).

Coordinates follow `cmsa_hf.geometry`: continuous, pixel i spanning [i, i + 1] (its centre at i + 0.5), so an input
crop of width W maps to heatmaps of width w by a plain scaling x * w / W, and a horizontal mirror is x -> W - x at
every resolution.
"""

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import flip_horizontally, resize_matrix, swap_pairs


DECODERS = ("dark", "quarter")


class HeatmapCodec:
    """Keypoints (in input-crop pixels) <-> one Gaussian heatmap per keypoint at the model's output resolution.

    Args:
        input_size: (height, width) of the network input crop.
        heatmap_size: (height, width) of the heatmaps (the stage-1 map: the input size divided by the stem stride).
        sigma: Gaussian std in heatmap pixels; default scales with the heatmap: 1 at 24 pixels wide (32x24), 2 at 48.
        decoder: "dark" (argmax + Taylor refinement on the log of the blurred heatmap, Zhang et al. 2020) or
            "quarter" (argmax moved a quarter pixel towards the higher neighbour, the classic HRNet decoding).
    """

    def __init__(self, input_size, heatmap_size, sigma: float | None = None, decoder: str = "dark"):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        self.input_size = tuple(int(v) for v in input_size)
        self.heatmap_size = tuple(int(v) for v in heatmap_size)
        self.sigma = float(sigma) if sigma is not None else gaussian_sigma_for(self.heatmap_size)
        self.decoder = decoder
        self.stride = np.diag(resize_matrix(self.heatmap_size, self.input_size))[:2].copy()  # (x, y) input pixels per heatmap pixel

    # ------------------------------------------------------------------------------------------------ encode

    def encode(self, keypoints: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """keypoints (..., K, 2) in input-crop pixels, visible (..., K) -> heatmaps (..., K, h, w), weights (..., K).

        Unbiased encoding: each Gaussian is centred at the exact sub-pixel location. A keypoint weighs 0 when it is
        not labelled (visible == 0) or its Gaussian lies entirely outside the heatmap (beyond 3 sigma).
        """
        keypoints = np.asarray(keypoints, dtype=np.float64)
        centres = keypoints / self.stride  # (..., K, 2) heatmap coordinates
        height, width = self.heatmap_size
        xs = np.arange(width, dtype=np.float64) + 0.5
        ys = np.arange(height, dtype=np.float64) + 0.5
        dx = xs - centres[..., 0:1]  # (..., K, w)
        dy = ys - centres[..., 1:2]  # (..., K, h)
        heatmaps = np.exp(-(dy[..., :, None] ** 2 + dx[..., None, :] ** 2) / (2 * self.sigma**2))
        reach = 3 * self.sigma
        inside = (
            (centres[..., 0] > -reach) & (centres[..., 0] < width + reach)
            & (centres[..., 1] > -reach) & (centres[..., 1] < height + reach)
        )  # fmt: skip
        weights = ((np.asarray(visible) > 0) & inside).astype(np.float32)
        heatmaps = heatmaps * weights[..., None, None]
        return heatmaps.astype(np.float32), weights

    # ------------------------------------------------------------------------------------------------ decode

    def decode(self, heatmaps: torch.Tensor, kernel_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """heatmaps (N, K, h, w) -> keypoints (N, K, 2) in input-crop pixels, scores (N, K) (the heatmap maxima).
        `kernel_size` (odd): DARK's modulation kernel instead of `blur_kernel_size()`; the "quarter" decoder has none."""
        if kernel_size is not None:
            if self.decoder != "dark":
                raise ValueError(f"kernel_size sets DARK's Gaussian modulation; this codec decodes with {self.decoder!r}, which has none")
            if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
                raise ValueError(f"kernel_size must be an odd positive integer, got {kernel_size!r}")
        heatmaps = torch.as_tensor(heatmaps).float()
        n, k, height, width = heatmaps.shape
        flat = heatmaps.reshape(n, k, -1)
        scores, index = flat.max(dim=-1)
        peak = torch.stack([index % width, index // width], dim=-1)  # integer (x, y) of the maximum
        if self.decoder == "dark":
            offset = self._dark_offset(heatmaps, peak, kernel_size or self.blur_kernel_size())
        else:
            offset = self._quarter_offset(heatmaps, peak)
        coordinates = (peak.float() + 0.5 + offset) * torch.as_tensor(self.stride, dtype=torch.float32, device=heatmaps.device)
        return coordinates, scores

    @staticmethod
    def _gather(heatmaps: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """heatmaps[n, k, y, x] for per-keypoint integer positions (N, K), clamped to the map."""
        height, width = heatmaps.shape[-2:]
        flat_index = y.clamp(0, height - 1) * width + x.clamp(0, width - 1)
        return heatmaps.flatten(2).gather(-1, flat_index.unsqueeze(-1)).squeeze(-1)

    def _quarter_offset(self, heatmaps: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        height, width = heatmaps.shape[-2:]
        x, y = peak[..., 0], peak[..., 1]
        offset = torch.zeros(peak.shape, dtype=torch.float32, device=heatmaps.device)
        inner_x = (x > 0) & (x < width - 1)
        inner_y = (y > 0) & (y < height - 1)
        step_x = torch.sign(self._gather(heatmaps, x + 1, y) - self._gather(heatmaps, x - 1, y))
        step_y = torch.sign(self._gather(heatmaps, x, y + 1) - self._gather(heatmaps, x, y - 1))
        offset[..., 0] = torch.where(inner_x, 0.25 * step_x, 0.0)
        offset[..., 1] = torch.where(inner_y, 0.25 * step_y, 0.0)
        return offset

    def blur_kernel_size(self) -> int:
        """DARK's modulation kernel: 11 for sigma 2 (64x48 heatmaps), 5 for sigma 1 (32x24)."""
        return max(3, 2 * round(3 * self.sigma) - 1)

    def _blur(self, heatmaps: torch.Tensor, size: int) -> torch.Tensor:
        """Gaussian modulation with a `size` kernel (OpenCV's sigma for it), rescaled to keep each map's maximum."""
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
        positions = torch.arange(size, dtype=torch.float32, device=heatmaps.device) - size // 2
        taps = torch.exp(-(positions**2) / (2 * sigma**2))
        taps = taps / taps.sum()
        n, k, height, width = heatmaps.shape
        maps = heatmaps.reshape(n * k, 1, height, width)
        pad = size // 2
        maps = F.conv2d(F.pad(maps, (pad, pad, 0, 0)), taps.view(1, 1, 1, -1))
        maps = F.conv2d(F.pad(maps, (0, 0, pad, pad)), taps.view(1, 1, -1, 1))
        maps = maps.reshape(n, k, height, width)
        original_max = heatmaps.flatten(2).amax(-1)[..., None, None]
        blurred_max = maps.flatten(2).amax(-1)[..., None, None].clamp_min(1e-12)
        return maps * original_max / blurred_max

    def _dark_offset(self, heatmaps: torch.Tensor, peak: torch.Tensor, kernel_size: int) -> torch.Tensor:
        """Newton step on the log-heatmap at its maximum: offset = -H^-1 g (second-order Taylor expansion)."""
        height, width = heatmaps.shape[-2:]
        log_maps = torch.log(self._blur(heatmaps, kernel_size).clamp_min(1e-10))
        x, y = peak[..., 0], peak[..., 1]

        def at(dx, dy):
            return self._gather(log_maps, x + dx, y + dy)

        gx = 0.5 * (at(1, 0) - at(-1, 0))
        gy = 0.5 * (at(0, 1) - at(0, -1))
        hxx = 0.25 * (at(2, 0) - 2 * at(0, 0) + at(-2, 0))
        hyy = 0.25 * (at(0, 2) - 2 * at(0, 0) + at(0, -2))
        hxy = 0.25 * (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1))
        determinant = hxx * hyy - hxy**2
        valid = (x > 1) & (x < width - 2) & (y > 1) & (y < height - 2) & (determinant.abs() > 1e-12)
        safe = torch.where(valid, determinant, torch.ones_like(determinant))
        offset_x = -(hyy * gx - hxy * gy) / safe
        offset_y = -(hxx * gy - hxy * gx) / safe
        offset = torch.stack([offset_x, offset_y], dim=-1)
        # A step beyond one pixel means the quadratic model does not hold there: keep the argmax.
        valid = valid & (offset.abs() <= 1).all(dim=-1)
        return torch.where(valid.unsqueeze(-1), offset, torch.zeros_like(offset))


def flip_heatmaps_back(heatmaps: torch.Tensor, flip_pairs) -> torch.Tensor:
    """Heatmaps (N, K, h, w) predicted on a mirrored crop -> heatmaps of the original crop: mirror them and swap left / right.

    Under the continuous convention above the mirror is exact at any stride, so no one-pixel shift is needed (the
    shift of HRNet's flip test compensates a coordinate convention with pixel centres at integers).
    """
    return swap_pairs(flip_horizontally(heatmaps), flip_pairs, axis=1)


class AngleBinCodec:
    """Head-pose angles in degrees <-> bins (the Hopenet form): `num_bins` bins of `bin_width` degrees centred on
    0 (66 x 3 degrees: [-99, 99]).

    `encode` gives each angle's bin index (angles beyond the range go to the end bins); `decode` gives the expected
    angle of per-bin logits, with bin i standing for its centre -99 + 3 (i + 0.5).
    """

    def __init__(self, num_bins: int = 66, bin_width: float = 3.0):
        self.num_bins, self.bin_width = int(num_bins), float(bin_width)
        self.low = -0.5 * self.num_bins * self.bin_width

    @property
    def centres(self) -> torch.Tensor:
        return self.low + self.bin_width * (torch.arange(self.num_bins, dtype=torch.float32) + 0.5)

    def encode(self, angles: torch.Tensor) -> torch.Tensor:
        """angles (...) in degrees -> bin indices (...) int64."""
        index = torch.floor((torch.as_tensor(angles, dtype=torch.float32) - self.low) / self.bin_width)
        return index.clamp(0, self.num_bins - 1).long()

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., num_bins) -> expected angle (...) in degrees (softmax-weighted bin centres)."""
        return (logits.float().softmax(dim=-1) * self.centres.to(logits.device)).sum(dim=-1)


# ------------------------------------------------------------------------------------------------ head pose
#
# Angles are in degrees, in the order (yaw, pitch, roll), with the signs of 300W-LP / AFLW2000-3D's `Pose_Para`
# (stored as pitch, yaw, roll in radians; read as Hopenet and FSA-Net do). In the image (pinned on AFLW2000-3D by
# tests/test_data_head_pose.py):
# - positive yaw: the face turns towards the image's left (the subject's right);
# - positive pitch: the face turns up (chin up);
# - positive roll: the head tilts clockwise in the image, its top towards the image's right.
# A horizontal mirror of the face negates yaw and roll and keeps pitch.
#
# Rotation matrices live in the camera frame x right, y down, z into the image (right-handed, as in OpenCV):
# R = Rx(-pitch) @ Ry(yaw) @ Rz(roll). The columns of R are the head's axes: x towards the image's right, y towards
# the chin, z from the face to the back of the head (the face looks along -R[:, 2]).

MIRROR_ANGLE_SIGNS = (-1.0, 1.0, -1.0)


def _rotation(axis: int, angle: float) -> np.ndarray:
    """The right-handed rotation by `angle` radians about axis 0 (x), 1 (y) or 2 (z)."""
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    matrix = np.eye(3)
    matrix[i, i] = matrix[j, j] = np.cos(angle)
    matrix[i, j], matrix[j, i] = -np.sin(angle), np.sin(angle)
    return matrix


def euler_to_rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """The head rotation `Rx(-pitch) @ Ry(yaw) @ Rz(roll)` (degrees in; camera frame x right, y down, z in)."""
    yaw, pitch, roll = np.radians([yaw, pitch, roll])
    return _rotation(0, -pitch) @ _rotation(1, yaw) @ _rotation(2, roll)


def rotation_matrix_to_euler(matrix) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of a rotation matrix; the inverse of `euler_to_rotation_matrix` for |yaw| < 90."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"Expected a 3x3 rotation matrix, got shape {m.shape}")
    yaw = np.arctan2(m[0, 2], np.hypot(m[1, 2], m[2, 2]))
    pitch = np.arctan2(m[1, 2], m[2, 2])
    roll = np.arctan2(-m[0, 1], m[0, 0])
    return tuple(float(angle) for angle in np.degrees([yaw, pitch, roll]))


def mirror_angles(angles):
    """(..., 3) yaw, pitch, roll (NumPy array or tensor) -> the angles of the horizontally mirrored face."""
    if isinstance(angles, torch.Tensor):
        return angles * angles.new_tensor(MIRROR_ANGLE_SIGNS)
    return np.asarray(angles) * np.asarray(MIRROR_ANGLE_SIGNS, dtype=np.asarray(angles).dtype)


def gaussian_sigma_for(heatmap_size) -> float:
    """The default heatmap sigma: 1 pixel per 24 heatmap columns."""
    return heatmap_size[1] / 24.0


__all__ = ["MIRROR_ANGLE_SIGNS", "mirror_angles", "euler_to_rotation_matrix", "rotation_matrix_to_euler", "AngleBinCodec", "HeatmapCodec", "flip_heatmaps_back", "DECODERS", "gaussian_sigma_for"]
