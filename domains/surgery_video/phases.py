"""Phase vocabularies of the supported datasets (index = class id)."""

from __future__ import annotations

#: Cholec80 (Twinanda et al., IEEE TMI 2017): the names used in ``videoXX-phase.txt``, in surgical order.
CHOLEC80_PHASES = [
    "Preparation",
    "CalotTriangleDissection",
    "ClippingCutting",
    "GallbladderDissection",
    "GallbladderPackaging",
    "CleaningCoagulation",
    "GallbladderRetraction",
]

#: HeiCo / EndoVis 2017 Surgical Workflow Analysis: phase ids 0-13 of the challenge's data page
#: (spelling corrected: the page writes "spenic", "tranverse"). The challenge ignores
#: ``Exception`` in its evaluation; :class:`~domains.surgery_video.HeiCoData` drops it by default.
HEICO_PHASES = [
    "Preparation and orientation at abdomen",
    "Dissection of lymphnodes and blood vessels",
    "Retroperitoneal preparation to lower pancreatic border",
    "Retroperitoneal preparation of duodenum and pancreatic head",
    "Mobilizing the sigmoid and the descending colon",
    "Mobilizing the splenic flexure",
    "Mobilizing the transverse colon",
    "Mobilizing the ascending colon",
    "Dissection and resection of rectum",
    "Preparing the anastomosis extra-abdominally",
    "Preparing the anastomosis intra-abdominally",
    "Placing stoma",
    "Finishing the operation",
    "Exception",
]
