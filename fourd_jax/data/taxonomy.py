"""The shared vocabularies of the question families: option letters, camera moves, 4DThinker's
object classes and the sub-task names of each family.

Pure data, importing only the standard library: the simulator, the question generators, the
importers of released data and the model-side code (probes, rewards) all name things with these.
"""

from __future__ import annotations

LETTERS = "ABCD"  # option letters of every multiple-choice question

# Camera movements (SPEC 3.6), in their canonical order (moves are combined in this order).
CAMERA_MOVES = (
    "Pan Right", "Pan Left", "Dolly In", "Dolly Out", "Roll Clockwise", "Roll Counter-Clockwise",
    "Tilt Up", "Tilt Down", "Pedestal Up", "Pedestal Down", "Truck Left", "Truck Right",
)
OPPOSITE_MOVE = {
    "Pan Right": "Pan Left", "Dolly In": "Dolly Out", "Roll Clockwise": "Roll Counter-Clockwise",
    "Tilt Up": "Tilt Down", "Pedestal Up": "Pedestal Down", "Truck Left": "Truck Right",
}
OPPOSITE_MOVE.update({v: k for k, v in list(OPPOSITE_MOVE.items())})
# Each move changes one camera parameter: (parameter, sign). Angles in degrees, distances in metres.
MOVE_EFFECT = {
    "Pan Left": ("yaw", 1.0), "Pan Right": ("yaw", -1.0),
    "Tilt Up": ("pitch", 1.0), "Tilt Down": ("pitch", -1.0),
    "Roll Clockwise": ("roll", 1.0), "Roll Counter-Clockwise": ("roll", -1.0),
    "Dolly In": ("forward", 1.0), "Dolly Out": ("forward", -1.0),
    "Truck Right": ("right", 1.0), "Truck Left": ("right", -1.0),
    "Pedestal Up": ("up", 1.0), "Pedestal Down": ("up", -1.0),
}

# 4DThinker's object classes (SPEC 3.6): the options of its direction, speed and distance questions.
OBJECT_DIRECTIONS = (
    "Moving Left", "Moving Right", "Moving Up", "Moving Down", "Moving Left-Up", "Moving Left-Down",
    "Moving Right-Up", "Moving Right-Down", "Moving Toward Camera", "Moving Away from Camera", "Stationary",
)
OBJECT_SPEEDS = (
    "Speeding Up", "Slowing Down", "Maintaining a Constant Speed", "First Speeding Up, Then Slowing Down",
    "First Slowing Down, Then Speeding Up", "Moving at Varying Speeds",
)
OBJECT_DISTANCES = (
    "Getting Closer to Camera", "Getting Farther from Camera", "Maintaining Roughly the Same Distance",
    "First Getting Closer, Then Farther", "First Getting Farther, Then Closer",
)

# Sub-task names per question family.
FOURDTHINKER_SUBTASKS = ("camera_motion", "object_direction", "object_distance", "object_speed")
DSR_SUBTASKS = (  # SPEC 4: the 13 DSR Suite sub-tasks
    "abs_dis", "abs_dir", "abs_ori", "abs_spd", "abs_spd_comp", "abs_dir_pred",
    "rel_dis", "rel_dir", "rel_ori", "rel_spd", "rel_spd_comp", "rel_dir_pred", "non_temp",
)
MLLM4D_SUBTASKS = ("object_direction",)
