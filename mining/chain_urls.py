from django.urls import path

from . import chain_views

urlpatterns = [
    path("api/blobs/<str:cid>", chain_views.blob, name="api-blob"),
    path("api/chain/blocks", chain_views.chain_blocks, name="api-chain-blocks"),
    path("api/chain/head", chain_views.chain_head, name="api-chain-head"),
    path("api/chain/node", chain_views.chain_node, name="api-chain-node"),
    path("mining/ledger/", chain_views.ledger_page, name="mining-ledger"),
    path("mining/ledger/verify", chain_views.ledger_verify, name="mining-ledger-verify"),
    path("mining/ledger/blocks/<int:height>/", chain_views.block_page, name="mining-block"),
    path("mining/peers/", chain_views.peers_page, name="mining-peers"),
    path("mining/peers/<int:pk>/sync", chain_views.peer_sync, name="mining-peer-sync"),
    path("mining/models/", chain_views.models_page, name="mining-models"),
    path("mining/models/<int:pk>/fetch", chain_views.model_fetch, name="mining-model-fetch"),
    path("mining/models/<int:pk>/activate", chain_views.model_activate, name="mining-model-activate"),
    path("mining/models/rollback", chain_views.model_rollback, name="mining-model-rollback"),
]
