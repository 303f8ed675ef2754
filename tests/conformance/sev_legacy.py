"""Conformance table of the legacy SEV commands, derived from AMD's published firmware source
(amd/AMD-ASPFW, Genoa SEV firmware 1.55.25, ``fw/psp_bl_uapps/sev_uapp/src/``).

One row per check: the command, the guest the row starts from (``None``: no guest; else a guest state),
a mutation of the well-formed command buffer, the expected status, and the AMD function (file and
function) whose check produces it. ``writes_back`` says whether the mailbox copies the buffer back
(``sev_dispatch.c`` ``master_handler_table``). Rows are data; ``tests/test_conformance.py`` drives them
through ``Platform.issue_mailbox``.
"""

from __future__ import annotations

from pysev.firmware.sev.abi import Cmd, GuestState
from pysev.firmware.status import SevStatus as S

L, LS, R, SU, RU, SENT = (
    GuestState.LUPDATE,
    GuestState.LSECRET,
    GuestState.RUNNING,
    GuestState.SUPDATE,
    GuestState.RUPDATE,
    GuestState.SENT,
)
MC = "sev_mcmd.c"

# (command, start, {field: value or callable(ctx)}, status, writes_back, AMD function)
ROWS: list[tuple[Cmd, object, dict, S, bool, str]] = [
    # INIT (platform UNINIT: start "uninit")
    (Cmd.INIT, "uninit", {"flags": 2}, S.INVALID_CONFIG, False, f"{MC} init_cmd_buf_valid"),
    (Cmd.INIT, "uninit", {"mbz": 1}, S.INVALID_CONFIG, False, f"{MC} init_cmd_buf_valid"),
    (
        Cmd.INIT,
        "uninit",
        {"flags": 1, "tmr_address": 4096, "tmr_len": 1 << 20},
        S.INVALID_ADDRESS,
        False,
        "sev_es.c sev_es_reserve_trusted_region",
    ),
    (
        Cmd.INIT,
        "uninit",
        {"flags": 1, "tmr_address": 1 << 20, "tmr_len": 4096},
        S.INVALID_LENGTH,
        False,
        "sev_es.c sev_es_reserve_trusted_region",
    ),
    (
        Cmd.INIT,
        "uninit",
        {"flags": 1, "tmr_address": 1 << 20, "tmr_len": 1 << 20},
        S.SUCCESS,
        False,
        f"{MC} sev_mcmd_init_common",
    ),
    (Cmd.INIT, None, {}, S.INVALID_PLATFORM_STATE, False, f"{MC} sev_mcmd_init_common"),
    # SHUTDOWN, PLATFORM_RESET, PLATFORM_STATUS, PEK_GEN, PDH_GEN
    (Cmd.SHUTDOWN, R, {}, S.SUCCESS, False, f"{MC} sev_mcmd_shutdown"),
    (Cmd.PLATFORM_RESET, None, {}, S.INVALID_PLATFORM_STATE, False, f"{MC} sev_mcmd_platform_reset"),
    (Cmd.PLATFORM_RESET, "uninit", {}, S.SUCCESS, False, f"{MC} sev_mcmd_platform_reset"),
    (Cmd.PLATFORM_STATUS, "uninit", {}, S.SUCCESS, True, f"{MC} sev_mcmd_platform_status"),
    (Cmd.PEK_GEN, R, {}, S.INVALID_PLATFORM_STATE, False, f"{MC} sev_mcmd_pek_gen"),
    (Cmd.PEK_GEN, None, {}, S.SUCCESS, False, f"{MC} sev_mcmd_pek_gen"),
    (Cmd.PDH_GEN, "uninit", {}, S.INVALID_PLATFORM_STATE, False, f"{MC} sev_mcmd_pdh_gen"),
    (Cmd.PDH_GEN, R, {}, S.SUCCESS, False, f"{MC} sev_mcmd_pdh_gen"),
    # PEK_CSR, PDH_CERT_EXPORT, GET_ID: length queries
    (Cmd.PEK_CSR, None, {"len": 0}, S.INVALID_LENGTH, True, f"{MC} sev_mcmd_pek_csr"),
    (Cmd.PEK_CSR, None, {"address": 1 << 62}, S.INVALID_ADDRESS, False, f"{MC} sev_mcmd_pek_csr"),
    (Cmd.PEK_CSR, "uninit", {}, S.INVALID_PLATFORM_STATE, False, f"{MC} sev_mcmd_pek_csr"),
    (Cmd.PDH_CERT_EXPORT, None, {"cert_chain_len": 0}, S.INVALID_LENGTH, True, f"{MC} sev_mcmd_pdh_cert_export"),
    (Cmd.PDH_CERT_EXPORT, None, {}, S.SUCCESS, True, f"{MC} sev_mcmd_pdh_cert_export"),
    (Cmd.GET_ID, "uninit", {}, S.SUCCESS, True, f"{MC} sev_mcmd_get_id"),
    (Cmd.GET_ID, None, {"len": 8}, S.INVALID_LENGTH, True, f"{MC} sev_mcmd_get_id"),
    # PEK_CERT_IMPORT
    (Cmd.PEK_CERT_IMPORT, R, {}, S.INVALID_PLATFORM_STATE, False, f"{MC} sev_mcmd_pek_cert_import"),
    (Cmd.PEK_CERT_IMPORT, None, {"oca_cert_len": 1}, S.INVALID_LENGTH, False, f"{MC} sev_mcmd_pek_cert_import"),
    (
        Cmd.PEK_CERT_IMPORT,
        None,
        {"pek_cert_address": 1 << 62},
        S.INVALID_ADDRESS,
        False,
        f"{MC} sev_mcmd_pek_cert_import",
    ),
    # DF_FLUSH: no platform-state check; WBINVD first
    (Cmd.DF_FLUSH, "reinit", {}, S.WBINVD_REQUIRED, False, f"{MC} mcmd_df_flush_common"),
    (Cmd.DF_FLUSH, "wbinvd", {}, S.SUCCESS, False, f"{MC} mcmd_df_flush_common"),
    # GUEST_STATUS
    (Cmd.GUEST_STATUS, "uninit", {}, S.INVALID_PLATFORM_STATE, False, f"{MC} sev_mcmd_guest_status"),
    (Cmd.GUEST_STATUS, R, {"handle": 777}, S.SUCCESS, True, f"{MC} sev_mcmd_guest_status"),
    (Cmd.GUEST_STATUS, R, {}, S.SUCCESS, True, f"{MC} sev_mcmd_guest_status"),
    # ACTIVATE
    (Cmd.ACTIVATE, None, {}, S.INVALID_PLATFORM_STATE, False, f"{MC} sev_mcmd_activate"),
    (Cmd.ACTIVATE, "L-inactive", {"handle": 777}, S.INVALID_GUEST, False, f"{MC} sev_mcmd_activate"),
    (Cmd.ACTIVATE, "L-inactive", {"asid": 0}, S.INVALID_ASID, False, f"{MC} mcmd_activate_common"),
    (Cmd.ACTIVATE, "L-inactive", {"asid": 1}, S.INVALID_ASID, False, "sev_es.c sev_es_validate_asid"),
    (Cmd.ACTIVATE, R, {"asid": "own"}, S.ASID_OWNED, False, f"{MC} mcmd_activate_common"),
    (Cmd.ACTIVATE, R, {}, S.ACTIVE, False, f"{MC} mcmd_activate_common"),
    (Cmd.ACTIVATE, "SENT-inactive", {}, S.INVALID_GUEST_STATE, False, f"{MC} activate_common"),
    (Cmd.ACTIVATE, "dirty", {}, S.DF_FLUSH_REQUIRED, False, f"{MC} activate_common"),
    (Cmd.ACTIVATE, "L-inactive", {}, S.SUCCESS, False, "sev_guest.c sev_guest_activate"),
    # DEACTIVATE, DECOMMISSION
    (Cmd.DEACTIVATE, "L-inactive", {}, S.INACTIVE, False, f"{MC} sev_mcmd_deactivate"),
    (Cmd.DEACTIVATE, R, {"handle": 777}, S.INVALID_GUEST, False, f"{MC} sev_mcmd_deactivate"),
    (Cmd.DEACTIVATE, R, {}, S.SUCCESS, False, f"{MC} sev_mcmd_deactivate"),
    (Cmd.DECOMMISSION, R, {}, S.ACTIVE, False, f"{MC} mcmd_decommission_common"),
    (Cmd.DECOMMISSION, "L-inactive", {}, S.SUCCESS, False, f"{MC} sev_mcmd_decommission"),
    (Cmd.DECOMMISSION, None, {}, S.INVALID_PLATFORM_STATE, False, f"{MC} sev_mcmd_decommission"),
    # LAUNCH_START
    (Cmd.LAUNCH_START, "uninit", {}, S.INVALID_PLATFORM_STATE, False, f"{MC} sev_mcmd_launch_start"),
    (
        Cmd.LAUNCH_START,
        None,
        {"dh_cert_address": 4096, "session_len": 1},
        S.INVALID_LENGTH,
        False,
        f"{MC} sev_mcmd_launch_start",
    ),
    (
        Cmd.LAUNCH_START,
        None,
        {"dh_cert_address": 4096, "session_len": 128, "session_address": 1 << 62},
        S.INVALID_ADDRESS,
        False,
        f"{MC} sev_mcmd_launch_start",
    ),
    (Cmd.LAUNCH_START, None, {"handle": 777}, S.INVALID_GUEST, False, f"{MC} sev_mcmd_launch_start"),
    (Cmd.LAUNCH_START, None, {"policy": 4}, S.SUCCESS, True, f"{MC} sev_mcmd_launch_start"),
    # LAUNCH_UPDATE_DATA / VMSA
    (
        Cmd.LAUNCH_UPDATE_DATA,
        L,
        {"address": "guest+8", "len": 0},
        S.INVALID_ADDRESS,
        False,
        f"{MC} launch_update_common",
    ),
    (Cmd.LAUNCH_UPDATE_DATA, L, {"len": 8}, S.INVALID_LENGTH, False, f"{MC} launch_update_common"),
    (Cmd.LAUNCH_UPDATE_DATA, "L-inactive", {}, S.INACTIVE, False, f"{MC} launch_update_common"),
    (Cmd.LAUNCH_UPDATE_DATA, R, {}, S.INVALID_GUEST_STATE, False, f"{MC} launch_update_common"),
    (Cmd.LAUNCH_UPDATE_DATA, L, {}, S.SUCCESS, False, f"{MC} launch_update_common"),
    (Cmd.LAUNCH_UPDATE_VMSA, "init-only", {"len": 16}, S.INVALID_LENGTH, False, f"{MC} sev_mcmd_launch_update_vmsa"),
    (Cmd.LAUNCH_UPDATE_VMSA, "init-only", {}, S.INVALID_PLATFORM_STATE, False, f"{MC} launch_update_common"),
    (Cmd.LAUNCH_UPDATE_VMSA, L, {}, S.UNSUPPORTED, False, f"{MC} launch_update_common"),
    # LAUNCH_MEASURE
    (Cmd.LAUNCH_MEASURE, L, {"len": 0}, S.INVALID_LENGTH, True, f"{MC} sev_mcmd_launch_measure"),
    (Cmd.LAUNCH_MEASURE, R, {"len": 0}, S.INVALID_GUEST_STATE, False, f"{MC} sev_mcmd_launch_measure"),
    (Cmd.LAUNCH_MEASURE, L, {"len": 64}, S.SUCCESS, True, f"{MC} sev_mcmd_launch_measure"),
    # LAUNCH_SECRET
    (
        Cmd.LAUNCH_SECRET,
        R,
        {"guest_address": "guest+8", "hdr_len": 0},
        S.INVALID_ADDRESS,
        False,
        f"{MC} sev_mcmd_launch_secret",
    ),
    (Cmd.LAUNCH_SECRET, R, {"hdr_len": 0}, S.INVALID_LENGTH, False, f"{MC} sev_mcmd_launch_secret"),
    (Cmd.LAUNCH_SECRET, R, {}, S.INVALID_GUEST_STATE, False, f"{MC} sev_mcmd_launch_secret"),
    # LAUNCH_FINISH
    (Cmd.LAUNCH_FINISH, R, {}, S.INVALID_GUEST_STATE, False, f"{MC} sev_mcmd_launch_finish"),
    (Cmd.LAUNCH_FINISH, LS, {}, S.SUCCESS, False, f"{MC} sev_mcmd_launch_finish"),
    # SEND_START
    (Cmd.SEND_START, R, {"session_len": 1}, S.INVALID_LENGTH, True, f"{MC} sev_mcmd_send_start"),
    (Cmd.SEND_START, L, {}, S.INVALID_GUEST_STATE, False, f"{MC} sev_mcmd_send_start"),
    (Cmd.SEND_START, R, {"pdh_cert_len": 1}, S.INVALID_LENGTH, False, f"{MC} sev_mcmd_send_start"),
    (Cmd.SEND_START, R, {"session_address": 1 << 62}, S.INVALID_ADDRESS, False, f"{MC} sev_mcmd_send_start"),
    # SEND_UPDATE_DATA / VMSA
    (Cmd.SEND_UPDATE_DATA, "uninit", {}, S.INVALID_PLATFORM_STATE, False, f"{MC} sev_mcmd_send_update"),
    (Cmd.SEND_UPDATE_DATA, SU, {"hdr_len": 0, "handle": 777}, S.INVALID_LENGTH, True, f"{MC} sev_mcmd_send_update"),
    (Cmd.SEND_UPDATE_DATA, R, {}, S.INVALID_GUEST_STATE, False, f"{MC} sev_mcmd_send_update"),
    (Cmd.SEND_UPDATE_VMSA, SU, {}, S.UNSUPPORTED, False, f"{MC} sev_mcmd_send_update"),
    # SEND_FINISH / SEND_CANCEL
    (Cmd.SEND_FINISH, R, {}, S.INVALID_GUEST_STATE, False, f"{MC} sev_mcmd_send_finish"),
    (Cmd.SEND_FINISH, SU, {}, S.SUCCESS, False, f"{MC} sev_mcmd_send_finish"),
    (Cmd.SEND_CANCEL, SU, {}, S.SUCCESS, False, f"{MC} sev_mcmd_send_cancel"),
    (Cmd.SEND_CANCEL, SENT, {}, S.INVALID_GUEST_STATE, False, f"{MC} sev_mcmd_send_cancel"),
    # RECEIVE_START
    (Cmd.RECEIVE_START, "uninit", {}, S.INVALID_PLATFORM_STATE, False, f"{MC} sev_mcmd_receive_start"),
    (Cmd.RECEIVE_START, None, {"session_len": 1}, S.INVALID_LENGTH, False, f"{MC} sev_mcmd_receive_start"),
    (
        Cmd.RECEIVE_START,
        None,
        {"session_len": 128, "session_address": 1 << 62, "pdh_cert_len": 0},
        S.INVALID_ADDRESS,
        False,
        f"{MC} sev_mcmd_receive_start",
    ),
    (
        Cmd.RECEIVE_START,
        None,
        {"session_len": 128, "session_address": 4096, "pdh_cert_len": 0},
        S.INVALID_LENGTH,
        False,
        f"{MC} sev_mcmd_receive_start",
    ),
    # RECEIVE_UPDATE_DATA / VMSA
    (Cmd.RECEIVE_UPDATE_DATA, R, {}, S.INVALID_GUEST_STATE, False, f"{MC} sev_mcmd_receive_update"),
    (Cmd.RECEIVE_UPDATE_DATA, "RU-inactive", {}, S.INACTIVE, False, f"{MC} sev_mcmd_receive_update"),
    (Cmd.RECEIVE_UPDATE_DATA, RU, {"trans_len": 0}, S.INVALID_LENGTH, False, f"{MC} sev_mcmd_receive_update"),
    (
        Cmd.RECEIVE_UPDATE_DATA,
        RU,
        {"compressed": True, "guest_address": 1 << 62, "trans_address": 1 << 62},
        S.UNSUPPORTED,
        False,
        f"{MC} sev_mcmd_receive_update",
    ),
    (Cmd.RECEIVE_UPDATE_VMSA, RU, {}, S.UNSUPPORTED, False, f"{MC} sev_mcmd_receive_update"),
    # RECEIVE_FINISH
    (Cmd.RECEIVE_FINISH, R, {}, S.INVALID_GUEST_STATE, False, f"{MC} sev_mcmd_receive_finish"),
    (Cmd.RECEIVE_FINISH, RU, {}, S.SUCCESS, False, f"{MC} sev_mcmd_receive_finish"),
    # DBG_DECRYPT / DBG_ENCRYPT
    (
        Cmd.DBG_DECRYPT,
        R,
        {"src_addr": "guest+8", "len": 8, "handle": 777},
        S.INVALID_ADDRESS,
        False,
        f"{MC} sev_mcmd_dbg_decrypt",
    ),
    (Cmd.DBG_DECRYPT, R, {"len": 8, "handle": 777}, S.INVALID_LENGTH, False, f"{MC} sev_mcmd_dbg_decrypt"),
    (Cmd.DBG_DECRYPT, R, {"handle": 777}, S.INVALID_GUEST, False, f"{MC} sev_mcmd_dbg_decrypt"),
    (Cmd.DBG_DECRYPT, R, {"len": 0}, S.SUCCESS, False, f"{MC} debug_crypt_common"),
    (Cmd.DBG_DECRYPT, "L-inactive", {}, S.INACTIVE, False, f"{MC} debug_crypt_common"),
    (
        Cmd.DBG_ENCRYPT,
        R,
        {"dst_addr": "guest+8", "len": 8, "handle": 777},
        S.INVALID_ADDRESS,
        False,
        f"{MC} sev_mcmd_dbg_encrypt",
    ),
    (Cmd.DBG_ENCRYPT, R, {"len": 8, "handle": 777}, S.INVALID_LENGTH, False, f"{MC} sev_mcmd_dbg_encrypt"),
    (Cmd.DBG_ENCRYPT, R, {}, S.SUCCESS, False, f"{MC} sev_mcmd_dbg_encrypt"),
]
