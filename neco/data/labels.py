"""Class names and raw-id -> train-id lookup tables of the evaluation datasets (METHOD.md §7).

Each table is a numpy lookup array ``lut`` indexed by the raw value stored in a mask file: ``lut[v]`` is the
train id (or the ignore index), and ``-1`` marks a value that no valid file of that dataset contains, so that
a wrong mask folder is reported instead of silently scoring garbage.

The COCO tables are built-in copies of the ``categories`` of COCO's ``stuff_val2017.json`` and
``panoptic_val2017.json``; the reference reads them from those files, ``python -m neco.data.check`` compares
them with your copy when it is present.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

# Spec Appendix A: the ImageNet-100 subset (`imagenet100.txt`).
IMAGENET100_WNIDS = (
    "n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797 "
    "n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653 "
    "n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531 "
    "n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855 "
    "n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051 "
    "n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 "
    "n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 "
    "n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 "
    "n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 "
    "n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622"
).split()

VOC_CLASSES = (
    "background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()

# ADE20K SceneParsing (objectInfo150 short names); index 0 is "other", the ignored label.
ADE20K_CLASSES = ["other"] + [n.strip() for n in (
    "wall,building,sky,floor,tree,ceiling,road,bed,windowpane,grass,cabinet,sidewalk,person,earth,door,table,"
    "mountain,plant,curtain,chair,car,water,painting,sofa,shelf,house,sea,mirror,rug,field,armchair,seat,fence,"
    "desk,rock,wardrobe,lamp,bathtub,railing,cushion,base,box,column,signboard,chest of drawers,counter,sand,"
    "sink,skyscraper,fireplace,refrigerator,grandstand,path,stairs,runway,case,pool table,pillow,screen door,"
    "stairway,river,bridge,bookcase,blind,coffee table,toilet,flower,book,hill,bench,countertop,stove,palm,"
    "kitchen island,computer,swivel chair,boat,bar,arcade machine,hovel,bus,towel,light,truck,tower,chandelier,"
    "awning,streetlight,booth,television receiver,airplane,dirt track,apparel,pole,land,bannister,escalator,"
    "ottoman,bottle,buffet,poster,stage,van,ship,fountain,conveyer belt,canopy,washer,plaything,swimming pool,"
    "stool,barrel,basket,waterfall,tent,bag,minibike,cradle,oven,ball,food,step,tank,trade name,microwave,pot,"
    "animal,bicycle,lake,dishwasher,screen,blanket,sculpture,hood,sconce,vase,traffic light,tray,ashcan,fan,"
    "pier,crt screen,plate,monitor,bulletin board,shower,radiator,glass,clock,flag"
).split(",")]

CITYSCAPES_CLASSES = (
    "road,sidewalk,building,wall,fence,pole,traffic light,traffic sign,vegetation,terrain,sky,person,rider,car,"
    "truck,bus,train,motorcycle,bicycle"
).split(",")
# METHOD.md §7.4: labelIds -> train ids; every other id in 0..33 is 255.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

# COCO-Stuff categories 92..183: (name, supercategory), from stuff_val2017.json.
_STUFF = (
    "banner:textile blanket:textile branch:plant bridge:building building-other:building bush:plant "
    "cabinet:furniture-stuff cage:structural cardboard:raw-material carpet:floor ceiling-other:ceiling "
    "ceiling-tile:ceiling cloth:textile clothes:textile clouds:sky counter:furniture-stuff cupboard:furniture-stuff "
    "curtain:textile desk-stuff:furniture-stuff dirt:ground door-stuff:furniture-stuff fence:structural "
    "floor-marble:floor floor-other:floor floor-stone:floor floor-tile:floor floor-wood:floor flower:plant "
    "fog:water food-other:food-stuff fruit:food-stuff furniture-other:furniture-stuff grass:plant gravel:ground "
    "ground-other:ground hill:solid house:building leaves:plant light:furniture-stuff mat:textile "
    "metal:raw-material mirror-stuff:furniture-stuff moss:plant mountain:solid mud:ground napkin:textile "
    "net:structural paper:raw-material pavement:ground pillow:textile plant-other:plant plastic:raw-material "
    "platform:ground playingfield:ground railing:structural railroad:ground river:water road:ground rock:solid "
    "roof:building rug:textile salad:food-stuff sand:ground sea:water shelf:furniture-stuff sky-other:sky "
    "skyscraper:building snow:ground solid-other:solid stairs:furniture-stuff stone:solid straw:plant "
    "structural-other:structural table:furniture-stuff tent:building textile-other:textile towel:textile "
    "tree:plant vegetable:food-stuff wall-brick:wall wall-concrete:wall wall-other:wall wall-panel:wall "
    "wall-stone:wall wall-tile:wall wall-wood:wall water-other:water waterdrops:water window-blind:window "
    "window-other:window wood:solid other:other"
).split()
COCO_STUFF_CATEGORIES = [{"id": 92 + i, "name": n, "supercategory": s}
                         for i, (n, s) in enumerate(e.split(":") for e in _STUFF)]

# COCO thing categories (panoptic ids 1..90, isthing = 1) by supercategory: "id:name" entries.
_THINGS = {
    "person": "1:person",
    "vehicle": "2:bicycle,3:car,4:motorcycle,5:airplane,6:bus,7:train,8:truck,9:boat",
    "outdoor": "10:traffic light,11:fire hydrant,13:stop sign,14:parking meter,15:bench",
    "animal": "16:bird,17:cat,18:dog,19:horse,20:sheep,21:cow,22:elephant,23:bear,24:zebra,25:giraffe",
    "accessory": "27:backpack,28:umbrella,31:handbag,32:tie,33:suitcase",
    "sports": "34:frisbee,35:skis,36:snowboard,37:sports ball,38:kite,39:baseball bat,40:baseball glove,"
              "41:skateboard,42:surfboard,43:tennis racket",
    "kitchen": "44:bottle,46:wine glass,47:cup,48:fork,49:knife,50:spoon,51:bowl",
    "food": "52:banana,53:apple,54:sandwich,55:orange,56:broccoli,57:carrot,58:hot dog,59:pizza,60:donut,61:cake",
    "furniture": "62:chair,63:couch,64:potted plant,65:bed,67:dining table,70:toilet",
    "electronic": "72:tv,73:laptop,74:mouse,75:remote,76:keyboard,77:cell phone",
    "appliance": "78:microwave,79:oven,80:toaster,81:sink,82:refrigerator",
    "indoor": "84:book,85:clock,86:vase,87:scissors,88:teddy bear,89:hair drier,90:toothbrush",
}
COCO_THING_CATEGORIES = sorted(
    ({"id": int(i), "name": n, "supercategory": sup, "isthing": 1}
     for sup, entries in _THINGS.items() for i, n in (e.split(":") for e in entries.split(","))),
    key=lambda c: c["id"],
)


def _lut(size: int) -> np.ndarray:
    return np.full(size, -1, dtype=np.int64)


def identity_lut(num_classes: int, extra: Iterable[int] = ()) -> np.ndarray:
    """Ids 0..num_classes-1 kept, ``extra`` values (e.g. the 255 boundary of VOC) kept as they are."""
    lut = _lut(256)
    lut[:num_classes] = np.arange(num_classes)
    for v in extra:
        lut[v] = v
    return lut


def cityscapes_lut() -> np.ndarray:
    """labelIds 0..33 -> 19 train ids, the rest of 0..33 -> 255 (METHOD.md §7.4)."""
    lut = _lut(256)
    lut[:34] = 255
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


def coco_stuff_lut(categories: Iterable[Mapping] = COCO_STUFF_CATEGORIES) -> tuple[np.ndarray, list[str]]:
    """COCO-Stuff-15 (METHOD.md §7.2): stuff id -> index of its supercategory among the sorted supercategories
    other than "other"; 0 (unlabelled, read as 183 "other") and "other" -> 255. Pixelmaps hold 0 and 92..183
    only (the reference asserts it), so anything else is an error."""
    cats = list(categories)
    names = sorted({c["supercategory"] for c in cats} - {"other"})
    index = {s: i for i, s in enumerate(names)}
    lut = _lut(256)
    for c in cats:
        lut[c["id"]] = index.get(c["supercategory"], 255)
    lut[0] = 255
    return lut, names


def coco_things_lut(categories: Iterable[Mapping] = COCO_THING_CATEGORIES) -> tuple[np.ndarray, list[str]]:
    """COCO-Things-12 (METHOD.md §7.2): thing id -> index of its supercategory among the sorted thing
    supercategories; 0 (unlabelled), stuff ids and other ids up to 200, and 255 -> 255, as the reference does.
    Values 201..254 are no panoptic category: an error."""
    things = [c for c in categories if c.get("isthing", 1) == 1]
    names = sorted({c["supercategory"] for c in things})
    index = {s: i for i, s in enumerate(names)}
    lut = _lut(256)
    lut[:201] = 255
    lut[255] = 255
    for c in things:
        lut[c["id"]] = index[c["supercategory"]]
    return lut, names


def describe_lut(lut: np.ndarray) -> str:
    """The valid raw values of ``lut`` as ranges, e.g. ``0-20, 255`` (for error messages)."""
    valid = np.flatnonzero(lut >= 0)
    ranges, start = [], None
    for k, v in enumerate(valid):
        if start is None:
            start = v
        if k + 1 == len(valid) or valid[k + 1] != v + 1:
            ranges.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(ranges)
