from django.contrib.auth import views as auth_views
from django.urls import path

from . import api, views

urlpatterns = [
    path("accounts/signup/", views.signup, name="signup"),
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("accounts/profile/", views.profile, name="profile"),
    path("api/me", views.api_me, name="api-me"),
    path("accounts/tokens/<int:token_id>/revoke/", views.revoke_token, name="revoke-token"),
    # Governance pages
    path("governance/", views.proposal_list, name="governance"),
    path("governance/new/", views.proposal_create, name="proposal-create"),
    path("governance/my-votes/", views.my_votes, name="my-votes"),
    path("governance/<int:proposal_id>/", views.proposal_detail, name="proposal"),
    path("governance/<int:proposal_id>/live/", views.proposal_live, name="proposal-live"),
    path("governance/<int:proposal_id>/vote/", views.proposal_vote, name="proposal-vote"),
    path("governance/<int:proposal_id>/deposit/", views.proposal_deposit, name="proposal-deposit"),
    path("governance/<int:proposal_id>/cancel/", views.proposal_cancel, name="proposal-cancel"),
    # Governance API (bearer token)
    path("api/governance/proposals", api.proposals, name="api-proposals"),
    path("api/governance/proposals/<int:proposal_id>", api.proposal_detail, name="api-proposal"),
    path("api/governance/proposals/<int:proposal_id>/deposit", api.deposit, name="api-proposal-deposit"),
    path("api/governance/proposals/<int:proposal_id>/vote", api.vote, name="api-proposal-vote"),
]
