"""Reference nuclei counts from scikit-image's watershed pipeline on the squidpy test image.

Writes tests/data/segment_ref/squidpy_watershed.tsv, read by tests/test_image_segment.py (which does not
need scikit-image). Run in a separate environment holding scikit-image (never an expkit dependency):

    python3 -m venv /work/skvenv && /work/skvenv/bin/pip install scikit-image numpy scipy matplotlib
    /work/skvenv/bin/python tests/reference/make_segment_ref.py [path/to/squidpy_test_img.jpg]

Pipeline (the scikit-image gallery recipe): threshold_otsu, mask = img > t, distance_transform_edt,
peak_local_max(distance, footprint=np.ones((5, 5)), labels=mask) (exclude_border=True: 1 pixel),
markers = ndi.label of the peak mask (the gallery's default 4-connectivity: column n_objects_conn1; with
8-connectivity, one marker per plateau of maxima: n_objects_conn2), watershed(-distance, markers, mask=mask).
Intensities, defined with numpy only so that expkit's test rebuilds them bit for bit:
  "gray_inv": 255 - round(mean(R, G, B)) as uint8 (dark nuclei bright);
  "hematoxylin": Ruifrok & Johnston colour deconvolution, OD = -log10((I + 1) / 256), unit stain rows
                 H (0.650, 0.704, 0.286), E (0.072, 0.990, 0.105), DAB (0.268, 0.570, 0.776),
                 column 0 of OD @ inv(M), float32;
each on the whole image and on the crop rows 600:1200, cols 200:800.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import scipy
import skimage
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT.parent / "shared" / "data" / "visium_fixtures" / "squidpy_test_img.jpg"
STAINS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])


def intensities(rgb: np.ndarray) -> dict[str, np.ndarray]:
    gray = (255 - np.rint(rgb[:, :, :3].astype(np.float64).mean(axis=2))).astype(np.uint8)
    m = STAINS / np.linalg.norm(STAINS, axis=1, keepdims=True)
    col = np.linalg.inv(m)[:, 0].astype(np.float32)
    od = -np.log10((rgb[:, :, :3].astype(np.float32) + 1.0) / np.float32(256.0))
    return {"gray_inv": gray, "hematoxylin": od @ col}


def skimage_count(img: np.ndarray) -> tuple[float, int, int, int]:
    t = threshold_otsu(img)
    mask = img > t
    dist = ndi.distance_transform_edt(mask)
    coords = peak_local_max(dist, footprint=np.ones((5, 5)), labels=mask)
    peaks = np.zeros(dist.shape, bool)
    peaks[tuple(coords.T)] = True
    counts = []
    for structure in (None, np.ones((3, 3), bool)):
        markers, _ = ndi.label(peaks, structure=structure)
        labels = watershed(-dist, markers, mask=mask)
        counts.append(int(len(np.unique(labels[labels > 0]))))
    return float(t), int(mask.sum()), counts[0], counts[1]


def main(path: Path) -> None:
    rgb = plt.imread(path)
    rows = []
    for region, sl in (("whole", np.s_[:, :]), ("crop", np.s_[600:1200, 200:800])):
        for name, img in intensities(rgb[sl]).items():
            t, npx, n1, n2 = skimage_count(img)
            rows.append(f"{name}\t{region}\t{t!r}\t{npx}\t{n1}\t{n2}")
            print(rows[-1])
    out = ROOT / "tests" / "data" / "segment_ref" / "squidpy_watershed.tsv"
    head = (f"# scikit-image {skimage.__version__}, scipy {scipy.__version__}, numpy {np.__version__}: "
            f"tests/reference/make_segment_ref.py on {path.name} (squidpy's test image, shape {rgb.shape})\n"
            "intensity\tregion\tthreshold\tmask_pixels\tn_objects_conn1\tn_objects_conn2\n")
    out.write_text(head + "\n".join(rows) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)
