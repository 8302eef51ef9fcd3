from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from .models import ApiToken, User


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    list_display = ("username", "email", "wallet_address", "stake", "is_staff", "is_active", "date_joined")
    list_filter = ("is_staff", "is_superuser", "is_active")
    search_fields = ("username", "email", "wallet_address")
    fieldsets = BaseUserAdmin.fieldsets + (("R3MES", {"fields": ("wallet_address", "stake")}),)
    add_fieldsets = BaseUserAdmin.add_fieldsets + (("R3MES", {"fields": ("wallet_address", "stake")}),)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "user", "hint", "created", "last_used", "revoked_at")
    list_filter = ("revoked_at", "created")
    search_fields = ("name", "user__username", "hint")
    readonly_fields = ("key_hash", "hint", "created", "last_used")
    actions = ["revoke"]

    @admin.action(description="Revoke selected tokens")
    def revoke(self, request, queryset):
        for token in queryset:
            token.revoke()
