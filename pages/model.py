"""Model: pick a registered model, read its card, load a weights file safely."""
from __future__ import annotations

import streamlit as st

from pages import _shared
from skipviz import CIFAR_MODEL, DEFAULT_MODEL, CheckpointError, list_models, list_pretrained, dashboard
from skipviz.models.timm_wrap import supported_text

st.title(":material/neurology: Model")
model_key, lm = _shared.current_model()
_shared.model_banner(lm)
current_name = _shared.registry_name(model_key) if model_key.startswith("registry:") else None

shipped = [w for name in dict.fromkeys([DEFAULT_MODEL, CIFAR_MODEL])  # the two shipped defaults, one click each
           for w in list_pretrained() if w.name == name]
quick = st.columns(max(1, len(shipped)))
for col, weights in zip(quick, shipped):
    shipped_name = weights.name
    if col.button(f"Use the {weights.title or shipped_name} model", key=f"use_{shipped_name}",
                  disabled=current_name == shipped_name):
        st.session_state["sv_model_key"] = f"registry:{shipped_name}"
        st.session_state.pop("sv_model_upload", None)
        st.rerun()

st.subheader("Registered models")
st.dataframe(dashboard.models_table(), hide_index=True, key="models_table")
choices = list_models(pretrained=True) + list_models()
if _shared.default_model_name() not in choices:
    choices.insert(0, _shared.default_model_name())
name = st.selectbox("Model", choices, index=choices.index(current_name) if current_name in choices else 0,
                    key="model_choice")
if st.button("Use this model", key="use_model"):
    st.session_state["sv_model_key"] = f"registry:{name}"
    st.session_state.pop("sv_model_upload", None)
    st.rerun()

st.subheader(f"Model card: {lm.net.meta.display_name}")
st.dataframe(dashboard.model_card_table(lm.net), hide_index=True, key="card_table")

st.subheader("Load a weights file")
st.caption("Safetensors or a weights-only PyTorch file: nothing is unpickled, and the file must fit the "
           "architecture exactly.")
arch = st.selectbox("Architecture", list_models(), index=list_models().index(lm.net.meta.arch)
                    if lm.net.meta.arch in list_models() else 0, key="weights_arch")
timm_name = st.text_input("Or a timm model (timm:NAME): your own network's weights, or the heads file "
                          "`skipviz train --model timm:NAME` exported", key="weights_timm", placeholder="timm:resnet50",
                          value=lm.net.meta.arch if lm.net.meta.arch.startswith("timm:") else "").strip()
if timm_name:
    arch = timm_name if timm_name.startswith("timm:") else f"timm:{timm_name}"
    st.caption(f"Loading into {arch} (built by timm, never downloaded). Supported families: {supported_text()}.")
up = st.file_uploader("Weights file", type=["safetensors", "pt", "pth"], key="weights_upload")
if up is not None:
    data = up.getvalue()
    sha = _shared.digest(data)
    # an upload is adopted once (per architecture): while it stays in the uploader, "Use this model" above and
    # later reruns must not switch the session back to it; uploading the file again is a new upload
    upload_id = (arch, getattr(up, "file_id", None) or sha)
    shipped_name = dashboard.shipped_weights_with_sha256(arch, sha)
    if shipped_name is not None:  # byte-identical to a shipped file: the registered model, with its card
        if st.session_state.get("sv_adopted_upload") != upload_id:
            st.session_state["sv_adopted_upload"] = upload_id
            st.session_state["sv_model_key"] = f"registry:{shipped_name}"
            st.session_state.pop("sv_model_upload", None)
            st.rerun()
        if current_name == shipped_name:  # not after the user picked another model with the file still here
            st.success(f"{up.name} is byte-identical to the shipped weights of {shipped_name} (SHA-256 "
                       f"{sha[:16]}...): using that model with its model card (default thresholds, calibration).")
    elif st.session_state.get("sv_adopted_upload") != upload_id:
        try:
            _shared.uploaded_model(arch, sha, up.name, data)
        except CheckpointError as e:
            st.error(f"Cannot load {up.name}: {e}")
        else:
            st.session_state["sv_adopted_upload"] = upload_id
            st.session_state["sv_model_upload"] = {"arch": arch, "sha256": sha, "filename": up.name, "data": data}
            st.session_state["sv_model_key"] = f"upload:{sha}"
            st.rerun()  # the header, the sidebar and every cache follow the new model from the top
    elif model_key == f"upload:{sha}":
        st.success(f"Loaded {up.name} into {arch} (SHA-256 {sha[:16]}...); every page now uses it.")
