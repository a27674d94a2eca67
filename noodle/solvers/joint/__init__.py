"""Several models placed jointly on one cluster: the sharing model (:mod:`.model`), CP-SAT, a heuristic, ``solve_joint``."""

from noodle.solvers.joint.model import JointTables, build_joint_tables, joint_value, node_loads
from noodle.solvers.joint.run import JOINT_SOLVERS, JointResult, solve_joint

__all__ = ["JOINT_SOLVERS", "JointResult", "JointTables", "build_joint_tables", "joint_value", "node_loads",
           "solve_joint"]
