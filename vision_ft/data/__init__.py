"""Data modules for the formats people already have.

- :class:`ClassificationData`: the shared base (batches, splits, few-shot, corrupt policy).
- :class:`Samples` (:class:`FileSamples`, :class:`ArraySamples`): labelled images the datamodules index.
- :class:`ImageFolderData`: ``root/<split>/<class>/<image>``.
- :class:`CSVManifestData`: ``path,label`` CSV manifests.
- :class:`MedMNISTData`: MedMNIST-style ``.npz`` arrays (single- or multi-label).
- :class:`DomainFolderData`: ``root/<domain>/<class>/<image>``, leave-one-domain-out (domain generalisation).
- :class:`FewShotSplit`: CoOp-style k-shot draws written to and reused from JSON.
- :class:`VideoClipData`: videos with per-frame labels, causal clips, split by video (PyAV).
- :class:`COCODetectionData`: COCO ``instances_*.json`` + images for detection (ids remapped, box-safe augmentation).
- :class:`InstructionData`: instruction / chat JSONL for causal-LM SFT (label masks, packing) + an MCQ test file.
- :func:`read_mcq`, :class:`MCQItem`: TeleQnA-style multiple-choice questions (JSON, JSONL, AES zip).
- :func:`msrvtt_records`, :func:`msvd_records`, :func:`convert_captions`: MSR-VTT / MSVD captions as video
  conversation records (standard splits), written as JSONL for :class:`ConversationData`.
- :class:`CaptionedImageData`: images with captions (``metadata.jsonl`` or ``.txt``) for text-to-image tasks.
- :class:`OODData`: an in-distribution classification datamodule + OOD image folders (tagged test loader).
- :mod:`vision_ft.data.medical` (extra ``medical``): DICOM files/series and NIfTI volumes as images,
  patient-level splits, CheXpert / NIH ChestX-ray14 multi-label conventions.
"""

from .base import ClassificationData, EpochShuffleSampler, ResumableDataLoader, train_loader
from .caption_datasets import convert_captions, msrvtt_records, msvd_records
from .captioned import CaptionedImageData
from .coco import CategoryMap, COCODetectionData, coco_to_cxcywh, cxcywh_to_coco
from .domain_generalisation import DomainFolderData, write_domain_sample
from .few_shot import FewShotSplit, sample_indices
from .folder import CSVManifestData, ImageFolderData
from .mcq import MCQItem, read_mcq
from .text_sft import InstructionData
from .vl_sft import ConversationData
from .labelled_images import ArraySamples, FileSamples, ImageDataset, Samples, to_tensor
from .npz import MedMNISTData, npz_headers
from .ood import OODData, OODTestSet, list_images, write_ood_sample
from .video import (
    ClipDataset, ImageFrames, LabelledVideo, VideoClipData, VideoFrames, clip_indices, decode_video,
    extract_frames, split_videos, write_video,
)

__all__ = [
    "ClipDataset",
    "ImageFrames",
    "LabelledVideo",
    "VideoClipData",
    "VideoFrames",
    "clip_indices",
    "decode_video",
    "extract_frames",
    "split_videos",
    "write_video",
    "ArraySamples",
    "convert_captions",
    "msrvtt_records",
    "msvd_records",
    "CaptionedImageData",
    "COCODetectionData",
    "CSVManifestData",
    "CategoryMap",
    "ClassificationData",
    "DomainFolderData",
    "EpochShuffleSampler",
    "FewShotSplit",
    "FileSamples",
    "ImageDataset",
    "ConversationData",
    "ImageFolderData",
    "InstructionData",
    "MCQItem",
    "read_mcq",
    "MedMNISTData",
    "OODData",
    "OODTestSet",
    "ResumableDataLoader",
    "Samples",
    "coco_to_cxcywh",
    "cxcywh_to_coco",
    "list_images",
    "npz_headers",
    "sample_indices",
    "to_tensor",
    "train_loader",
    "write_domain_sample",
    "write_ood_sample",
]
