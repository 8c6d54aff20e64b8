"""Reading one image file as a checked 3-D float32 volume: what is wrong with a file is said in a `CaseError` naming
the case and the file, never silently repaired (readers replace a zero spacing by 1 mm, zero-fill a truncated
.nii.gz, turn NaN into 0)."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from mtl_breast.data.case import CaseError

# The most voxels one volume may hold: 2^28 (1 GiB as float32), e.g. 1024 x 1024 x 256; MAMA-MIA phases hold up to
# about 512 x 512 x 200. A header asking for more is refused before any voxel is read.
MAX_VOXELS = 2**28
# Deflate encodes at most 258 bytes in 2 bits (1032:1): a .nii.gz cannot hold more data than this times its size.
_MAX_GZIP_RATIO = 1032


def _nifti_size_problem(path: Path, header: nib.Nifti1Header) -> str | None:
    """Why the data the header announces cannot be read, or None: more than `MAX_VOXELS` voxels, or more bytes
    than the file can hold (a header "bomb": a small file whose header asks for gigabytes)."""
    dims = [int(d) for d in header["dim"][1:1 + max(0, min(int(header["dim"][0]), 7))]]
    if not dims or min(dims) < 1:
        return None  # the readers below refuse it, in their words
    voxels = math.prod(dims)
    shown = " x ".join(str(d) for d in dims)
    if voxels > MAX_VOXELS:
        return (f"the header announces {shown} = {voxels:,} voxels, more than the {MAX_VOXELS:,} accepted "
                "(refused before reading the voxels)")
    try:
        itemsize = np.dtype(header.get_data_dtype()).itemsize
        offset = int(header["vox_offset"])
    except Exception:  # noqa: BLE001 -- an unknown data type: the readers below say so
        return None
    needed, size = offset + voxels * itemsize, path.stat().st_size
    compressed = path.name.lower().endswith(".gz")
    if needed > size * (_MAX_GZIP_RATIO if compressed else 1):
        what = f"a {size:,}-byte compressed file holds at most {size * _MAX_GZIP_RATIO:,}" if compressed \
            else f"the file holds {size:,}"
        return (f"the header announces {shown} voxels of {itemsize} byte(s) ({needed:,} bytes), but {what}: the "
                "file is truncated or its header is wrong (refused before reading the voxels)")
    return None


def _nifti_header_problem(path: Path) -> str | None:
    """What is wrong with the spatial fields of a NIfTI header as written in the file, or with the size of the data
    it announces (`_nifti_size_problem`), or None.

    Read raw (nibabel's `check=False`), because both readers repair these fields on loading: a zero or NaN
    voxel size becomes 1.0 and a negative one its absolute value, which would put the phase on a wrong grid.
    """
    try:
        with nib.openers.ImageOpener(path) as f:
            sizeof_hdr = f.read(4)
        klass = nib.Nifti2Header if sizeof_hdr in ((540).to_bytes(4, "little"), (540).to_bytes(4, "big")) \
            else nib.Nifti1Header
        with nib.openers.ImageOpener(path) as f:
            header = klass.from_fileobj(f, check=False)
    except Exception:  # noqa: BLE001 -- not a readable header: the readers below say why, in their words
        return None
    problem = _nifti_size_problem(path, header)
    if problem is not None:
        return problem
    ndim = int(header["dim"][0])
    pixdim = [float(v) for v in header["pixdim"][1:1 + min(max(ndim, 1), 3)]]
    if not all(math.isfinite(v) and v > 0 for v in pixdim):
        shown = "(" + ", ".join(f"{v:g}" for v in pixdim) + ")"
        return (f"voxel spacing {shown} in the header (pixdim) must be positive and finite "
                "(readers would silently replace it, e.g. by 1 mm, and misplace the volume)")
    if header["sform_code"] > 0:
        sform = np.stack([header["srow_x"], header["srow_y"], header["srow_z"]]).astype(np.float64)
        if not np.isfinite(sform).all() or abs(np.linalg.det(sform[:, :3])) < 1e-6 * np.prod(pixdim):
            return f"the header's sform {sform.round(4).tolist()} is not a valid (finite, invertible) affine"
    if header["qform_code"] > 0:
        fields = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")
        if not all(math.isfinite(float(header[k])) for k in fields):
            return "the header's qform holds NaN/Inf"
    return None


def _geometry_problem(image: sitk.Image) -> str | None:
    """What is wrong with a volume's spacing, origin or direction (any format), or None."""
    spacing, origin = np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin())
    direction = np.reshape(image.GetDirection(), (3, 3))
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        return f"voxel spacing {spacing.tolist()} must be positive and finite"
    if not np.isfinite(origin).all():
        return f"origin {origin.tolist()} must be finite"
    if not np.isfinite(direction).all() or abs(np.linalg.det(direction)) < 1e-3:
        return f"direction {direction.round(4).tolist()} is not a rotation (orientation unknown)"
    return None


def read_volume(path: Path, patient_id: str, what: str = "image") -> sitk.Image:
    """Read a 3-D volume as float32, refusing unreadable, truncated, non-3-D and NaN/Inf files, single-slice
    volumes, headers with an invalid spacing, origin or direction, and headers announcing more than `MAX_VOXELS`
    voxels or more data than the file can hold (checked before any voxel is read).

    NIfTI voxels are decoded with nibabel and the geometry taken from SimpleITK's reading of the header:
    SimpleITK's NIfTI reader silently zero-fills a truncated .nii.gz and replaces NaN/Inf by 0, so neither
    defect would be visible in its array. Other formats (.mha, .nrrd) go through SimpleITK, which reports both.
    """
    try:
        if path.name.lower().endswith((".nii", ".nii.gz")):
            problem = _nifti_header_problem(path)
            if problem is not None:
                raise CaseError(patient_id, path, problem)
            header = sitk.ImageFileReader()
            header.SetFileName(str(path))
            header.SetImageIO("NiftiImageIO")
            header.ReadImageInformation()
            # Raw (scaled) voxels; raises on truncated data. Fortran order, so `.T` below is a free C-order view.
            voxels = np.asarray(nib.load(path).dataobj).astype(np.float32, copy=False)
            voxels = voxels[..., 0] if voxels.ndim == 4 and voxels.shape[3] == 1 else voxels
            if voxels.ndim != 3:
                raise CaseError(patient_id, path, f"expected a 3-D {what}, got a {voxels.ndim}-D one of shape "
                                                  f"{voxels.shape}" + _hint(voxels.ndim))
            n = header.GetDimension()
            image = sitk.GetImageFromArray(np.ascontiguousarray(voxels.T))  # nibabel (i, j, k) -> SimpleITK (k, j, i)
            image.SetSpacing(header.GetSpacing()[:3])
            image.SetOrigin(header.GetOrigin()[:3])
            image.SetDirection(np.reshape(header.GetDirection(), (n, n))[:3, :3].ravel().tolist())
        else:
            header = sitk.ImageFileReader()
            header.SetFileName(str(path))
            header.ReadImageInformation()
            voxels = math.prod(header.GetSize()) * header.GetNumberOfComponents()
            if voxels > MAX_VOXELS:
                raise CaseError(patient_id, path, f"the header announces {' x '.join(map(str, header.GetSize()))} = "
                                                  f"{voxels:,} voxels, more than the {MAX_VOXELS:,} accepted "
                                                  "(refused before reading the voxels)")
            image = sitk.ReadImage(str(path), sitk.sitkFloat32)
            image = image[:, :, :, 0] if image.GetDimension() == 4 and image.GetSize()[3] == 1 else image
            if image.GetDimension() != 3:
                raise CaseError(patient_id, path, f"expected a 3-D {what}, got a {image.GetDimension()}-D one of "
                                                  f"size {image.GetSize()}" + _hint(image.GetDimension()))
    except (RuntimeError, OSError, EOFError, ValueError, MemoryError, zlib.error, ImageFileError,
            HeaderDataError) as err:
        if isinstance(err, CaseError):
            raise
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise CaseError(patient_id, path, f"cannot read {what} ({reason})") from err
    if min(image.GetSize()) < 2:
        raise CaseError(patient_id, path, f"expected a 3-D {what}, got a single slice (size {image.GetSize()})")
    problem = _geometry_problem(image)
    if problem is not None:
        raise CaseError(patient_id, path, problem)
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        raise CaseError(patient_id, path, f"{int((~np.isfinite(array)).sum())} NaN/Inf voxels")
    return image


def _hint(ndim: int) -> str:
    if ndim > 3:
        return " (a series in one file: give each phase its own 3-D file)"
    return " (a single slice)" if ndim < 3 else ""
